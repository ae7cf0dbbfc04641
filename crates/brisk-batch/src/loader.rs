//! The DataLoader.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_core::deadline;
use foldhash::quality::RandomState;
use futures_util::future::{BoxFuture, FutureExt, join_all};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::Cache;
use crate::engine::{
    self, Abandoned, Batch, Limits, Owner, Queued, Settings, Wait, lock, panic_message,
};
use crate::metrics::Metrics;
use crate::{BatchFn, BuildError, LoadError};

/// What a loader answers for a key its batch function did not return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// `Ok(None)`. The default.
    #[default]
    None,
    /// `Err(LoadError::NotFound)`.
    Error,
}

/// The shared result of one batch.
type Outcome<K, V, E> = Arc<Result<HashMap<K, V>, LoadError<E>>>;

/// A waiter of one of a loader's batches.
type LoaderWait<K, V, F> = Wait<Shared<K, V, F>, Outcome<K, V, <F as BatchFn<K, V>>::Error>>;

/// One of a loader's batches.
type LoaderBatch<K, V, E> = Arc<Batch<Outcome<K, V, E>>>;

/// Batches concurrent loads of single keys into calls of a [`BatchFn`]. See the
/// [crate docs](crate) for the rules.
///
/// Cloning is cheap and clones share everything (batches, cache, limits).
pub struct Loader<K, V, F: BatchFn<K, V>> {
    shared: Arc<Shared<K, V, F>>,
}

impl<K, V, F: BatchFn<K, V>> Clone for Loader<K, V, F> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, V, F: BatchFn<K, V>> fmt::Debug for Loader<K, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("name", &self.shared.name)
            .field("max_batch_size", &self.shared.settings.max_batch_size)
            .field("window", &self.shared.settings.window)
            .finish_non_exhaustive()
    }
}

struct Shared<K, V, F: BatchFn<K, V>> {
    name: Arc<str>,
    batch_fn: F,
    settings: Settings,
    missing: MissingKey,
    slots: Arc<Semaphore>,
    max_queued: usize,
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    metrics: Metrics,
    state: Mutex<State<K, V, F::Error>>,
}

struct State<K, V, E> {
    /// The batch taking keys now, and its keys.
    collecting: Option<(LoaderBatch<K, V, E>, Vec<K>)>,
    /// Every key in a batch that has not finished, so a second load of it joins that batch.
    /// Hashed with foldhash: keyed by user input, so seeded per map, and several times faster
    /// than std's default hasher on the hot path.
    in_flight: HashMap<K, LoaderBatch<K, V, E>, RandomState>,
    cache: Option<Cache<K, V>>,
}

/// Settings for a [`Loader`]; every setter consumes and returns the builder.
#[must_use]
pub struct LoaderBuilder<F> {
    batch_fn: F,
    name: String,
    limits: Limits,
    cache: Option<usize>,
    missing: MissingKey,
    abandoned: Abandoned,
}

impl<F> fmt::Debug for LoaderBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoaderBuilder")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<F> LoaderBuilder<F> {
    /// The `loader` label of this loader's metrics and spans. Default: `"loader"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The most keys in one batch; a larger demand is split. Default: 500.
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.limits.max_batch_size = max;
        self
    }

    /// Collect keys for this long after a batch's first key, instead of one scheduler turn.
    /// Larger batches, higher latency. A waiter whose deadline is nearer than the window makes
    /// its batch dispatch at once.
    pub fn window(mut self, window: Duration) -> Self {
        self.limits.window = Some(window);
        self
    }

    /// The most batches running at once; more wait for a slot. Default: 10.
    pub fn max_concurrent_batches(mut self, max: usize) -> Self {
        self.limits.max_concurrent_batches = max;
        self
    }

    /// The most sealed batches waiting for a slot; a load that would start another fails with
    /// [`LoadError::Overloaded`]. Default: 1,000.
    pub fn max_queued_batches(mut self, max: usize) -> Self {
        self.limits.max_queued_batches = max;
        self
    }

    /// Keep up to `capacity` loaded values, oldest evicted first. Off by default: a loader
    /// made per request can turn it on freely, a shared one should think about staleness.
    pub fn cache(mut self, capacity: usize) -> Self {
        self.cache = Some(capacity);
        self
    }

    /// What a key absent from the batch function's answer gives. Default: `Ok(None)`.
    pub fn missing(mut self, policy: MissingKey) -> Self {
        self.missing = policy;
        self
    }

    /// What happens to a batch all of whose callers went away. Default: cancel it.
    pub fn abandoned(mut self, policy: Abandoned) -> Self {
        self.abandoned = policy;
        self
    }

    /// Checks the settings and builds the loader.
    ///
    /// # Errors
    /// [`BuildError`] if a size, limit or capacity is zero, or the window is zero.
    pub fn build<K, V>(self) -> Result<Loader<K, V, F>, BuildError>
    where
        F: BatchFn<K, V>,
    {
        self.limits.validate()?;
        if self.cache == Some(0) {
            return Err(BuildError("cache capacity must be at least 1"));
        }
        Ok(Loader {
            shared: Arc::new(Shared {
                metrics: Metrics::new(&self.name),
                name: self.name.into(),
                batch_fn: self.batch_fn,
                settings: self.limits.settings(self.abandoned),
                missing: self.missing,
                slots: self.limits.slots(),
                max_queued: self.limits.max_queued_batches,
                queued: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(0),
                state: Mutex::new(State {
                    collecting: None,
                    in_flight: HashMap::default(),
                    cache: self.cache.map(Cache::new),
                }),
            }),
        })
    }
}

/// What `enqueue` found for a key: a cached value, or a batch to wait for.
enum Enqueued<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    Cached(V),
    Wait(LoaderWait<K, V, F>),
}

impl<K, V, F> Loader<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    /// A loader with the default settings.
    pub fn new(batch_fn: F) -> Self {
        Self::builder(batch_fn)
            .build()
            .expect("the default settings are valid")
    }

    /// Starts a builder with the defaults.
    pub fn builder(batch_fn: F) -> LoaderBuilder<F> {
        LoaderBuilder {
            batch_fn,
            name: "loader".to_owned(),
            limits: Limits::default(),
            cache: None,
            missing: MissingKey::None,
            abandoned: Abandoned::Cancel,
        }
    }

    /// Loads one key, batched with every other load of the moment.
    ///
    /// `Ok(None)` when the batch function did not return the key (see [`MissingKey`]). Waits at
    /// most until the caller's deadline, if a `brisk_core::deadline::scope` set one.
    ///
    /// # Errors
    /// [`LoadError`]: the batch failed or panicked, the deadline passed, the key was missing
    /// under [`MissingKey::Error`], or the loader is overloaded.
    pub fn load(&self, key: K) -> Load<'_, K, V, F> {
        Load {
            loader: self,
            key: Some(key),
            state: LoadState::Start,
        }
    }

    /// Loads many keys; the result holds the ones found. Duplicates are loaded once; an empty
    /// list returns at once without a batch. Larger demands than `max_batch_size` are split.
    ///
    /// # Errors
    /// The first [`LoadError`] of any of its batches.
    pub async fn load_many(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<HashMap<K, V>, LoadError<F::Error>> {
        let mut found = HashMap::new();
        let mut waits = Vec::new();
        for key in keys {
            if found.contains_key(&key) {
                continue;
            }
            match self.enqueue(key.clone())? {
                Enqueued::Cached(value) => {
                    found.insert(key, value);
                }
                Enqueued::Wait(wait) => waits.push((key, wait)),
            }
        }
        let (keys, waits): (Vec<K>, Vec<_>) = waits.into_iter().unzip();
        let outcomes = within_deadline(join_all(waits)).await?;
        for (key, outcome) in keys.into_iter().zip(outcomes) {
            if let Some(value) = self.pick(&outcome, &key)? {
                found.insert(key, value);
            }
        }
        Ok(found)
    }

    /// Puts a value in the cache unless the key is cached already; true if it was stored.
    /// Without a cache (the default) nothing is stored and this returns false.
    pub fn prime(&self, key: K, value: V) -> bool {
        let mut state = lock(&self.shared.state);
        state
            .cache
            .as_mut()
            .is_some_and(|cache| cache.insert_if_absent(key, value))
    }

    /// Forgets the cached value of `key`, so the next load fetches it again.
    pub fn clear(&self, key: &K) {
        if let Some(cache) = lock(&self.shared.state).cache.as_mut() {
            cache.remove(key);
        }
    }

    /// Forgets every cached value.
    pub fn clear_all(&self) {
        if let Some(cache) = lock(&self.shared.state).cache.as_mut() {
            cache.clear();
        }
    }

    /// Dispatches the collecting batch now instead of when its window closes.
    pub fn flush(&self) {
        let taken = lock(&self.shared.state).collecting.take();
        if let Some((batch, keys)) = taken {
            engine::seal_with(&self.shared, &batch, keys);
        }
    }

    fn enqueue(&self, key: K) -> Result<Enqueued<K, V, F>, LoadError<F::Error>> {
        let shared = &self.shared;
        shared.metrics.requested.increment(1);
        let mut state = lock(&shared.state);
        if let Some(value) = state.cache.as_ref().and_then(|cache| cache.get(&key)) {
            shared.metrics.cached.increment(1);
            return Ok(Enqueued::Cached(value.clone()));
        }
        if let Some(batch) = state.in_flight.get(&key) {
            shared.metrics.deduplicated.increment(1);
            let wait = Wait::new(Arc::clone(shared), Arc::clone(batch), false);
            return Ok(Enqueued::Wait(wait));
        }
        let (batch, creator) = match &mut state.collecting {
            Some((batch, keys)) => {
                keys.push(key.clone());
                (Arc::clone(batch), false)
            }
            None => {
                if shared.queued.load(Ordering::Acquire) >= shared.max_queued {
                    return Err(LoadError::Overloaded);
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let batch = Arc::new(Batch::new(id));
                state.collecting = Some((Arc::clone(&batch), vec![key.clone()]));
                (batch, true)
            }
        };
        let wait = Wait::new(Arc::clone(shared), Arc::clone(&batch), creator);
        state.in_flight.insert(key, Arc::clone(&batch));
        let len = state.collecting.as_ref().map_or(0, |(_, keys)| keys.len());
        let sealed = if shared.settings.seal_now(&batch, len) {
            state.collecting.take().map(|(_, keys)| keys)
        } else {
            None
        };
        drop(state);
        if let Some(keys) = sealed {
            engine::seal_with(shared, &batch, keys);
        }
        Ok(Enqueued::Wait(wait))
    }

    fn pick(
        &self,
        outcome: &Outcome<K, V, F::Error>,
        key: &K,
    ) -> Result<Option<V>, LoadError<F::Error>> {
        match &**outcome {
            Ok(values) => match (values.get(key), self.shared.missing) {
                (Some(value), _) => Ok(Some(value.clone())),
                (None, MissingKey::None) => Ok(None),
                (None, MissingKey::Error) => Err(LoadError::NotFound),
            },
            Err(err) => Err(err.clone()),
        }
    }
}

/// The future of [`Loader::load`]: small (it is moved into every task that loads), and it
/// enqueues its key when first polled.
#[must_use = "futures do nothing unless polled"]
pub struct Load<'a, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    loader: &'a Loader<K, V, F>,
    /// Taken when the result is picked.
    key: Option<K>,
    state: LoadState<K, V, F>,
}

enum LoadState<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    Start,
    Waiting(LoaderWait<K, V, F>),
    /// The caller set a deadline; its timer is boxed so that loads without one stay small.
    Bounded(Pin<Box<deadline::Bounded<LoaderWait<K, V, F>>>>),
    Done,
}

impl<K, V, F> Unpin for Load<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
}

impl<K, V, F> Future for Load<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    type Output = Result<Option<V>, LoadError<F::Error>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let outcome = match &mut this.state {
                LoadState::Start => {
                    let key = this
                        .key
                        .clone()
                        .expect("the key stays until the result is picked");
                    this.state = match this.loader.enqueue(key) {
                        Err(err) => return this.finish(Err(err)),
                        Ok(Enqueued::Cached(value)) => return this.finish(Ok(Some(value))),
                        Ok(Enqueued::Wait(wait)) if deadline::current().is_some() => {
                            LoadState::Bounded(Box::pin(deadline::bounded(Duration::MAX, wait)))
                        }
                        Ok(Enqueued::Wait(wait)) => LoadState::Waiting(wait),
                    };
                    continue;
                }
                LoadState::Waiting(wait) => std::task::ready!(Pin::new(wait).poll(cx)),
                LoadState::Bounded(wait) => match std::task::ready!(wait.as_mut().poll(cx)) {
                    Ok(outcome) => outcome,
                    Err(elapsed) => return this.finish(Err(LoadError::Deadline(elapsed))),
                },
                LoadState::Done => panic!("a load was polled after it completed"),
            };
            let key = this
                .key
                .take()
                .expect("the key stays until the result is picked");
            let picked = this.loader.pick(&outcome, &key);
            return this.finish(picked);
        }
    }
}

impl<K, V, F> Load<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    fn finish<T>(&mut self, result: T) -> Poll<T> {
        // Dropping the wait now releases the batch before the caller sees the result.
        self.state = LoadState::Done;
        Poll::Ready(result)
    }
}

impl<K, V, F> fmt::Debug for Load<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load").finish_non_exhaustive()
    }
}

/// Bounds a wait by the caller's deadline, when there is one. The deadline's timer is boxed so
/// that loads without a deadline (most) keep a small future.
async fn within_deadline<T, E>(wait: impl Future<Output = T>) -> Result<T, LoadError<E>> {
    if deadline::current().is_none() {
        return Ok(wait.await);
    }
    Box::pin(deadline::bounded(Duration::MAX, wait))
        .await
        .map_err(LoadError::Deadline)
}

impl<K, V, F> Owner for Shared<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    type Item = K;
    type Output = Outcome<K, V, F::Error>;

    fn take_items(&self, batch: &Batch<Self::Output>) -> Option<Vec<K>> {
        let mut state = lock(&self.state);
        match &state.collecting {
            Some((current, _)) if current.id == batch.id => {
                state.collecting.take().map(|(_, keys)| keys)
            }
            _ => None,
        }
    }

    fn run(
        self: &Arc<Self>,
        batch: &Batch<Self::Output>,
        keys: Vec<K>,
    ) -> BoxFuture<'static, Self::Output> {
        let this = Arc::clone(self);
        let (id, created) = (batch.id, batch.created);
        let queued = Queued::new(&self.queued);
        Box::pin(async move {
            let slot = Arc::clone(&this.slots)
                .acquire_owned()
                .await
                .expect("the loader never closes its semaphore");
            drop(queued);
            this.metrics.dispatched(keys.len(), created.elapsed());
            let span = tracing::debug_span!("brisk.batch.dispatch", loader = %this.name, keys = keys.len());
            let started = Instant::now();
            let result = AssertUnwindSafe(this.batch_fn.load(&keys))
                .catch_unwind()
                .instrument(span)
                .await;
            drop(slot);
            this.metrics
                .duration
                .record(started.elapsed().as_secs_f64());
            let outcome = match result {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(err)) => {
                    this.metrics.errors.increment(1);
                    Err(LoadError::Batch(Arc::new(err)))
                }
                Err(panic) => {
                    this.metrics.panics.increment(1);
                    Err(LoadError::Panicked(panic_message(&*panic).into()))
                }
            };
            this.finish(id, &keys, &outcome);
            Arc::new(outcome)
        })
    }

    fn forget(&self, batch: &Arc<Batch<Self::Output>>) {
        {
            let mut state = lock(&self.state);
            // A new waiter may have joined since the count reached zero, or the batch finished.
            if batch.waiters() > 0 || batch.finished() {
                return;
            }
            state.in_flight.retain(|_, b| b.id != batch.id);
        }
        batch.abandon(self.settings.abandoned);
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }
}

impl<K, V, F> Shared<K, V, F>
where
    K: Hash + Eq + Clone,
    V: Clone,
    F: BatchFn<K, V>,
{
    /// A batch ended: its keys leave the in-flight map, found values enter the cache.
    fn finish(&self, id: u64, keys: &[K], outcome: &Result<HashMap<K, V>, LoadError<F::Error>>) {
        let mut state = lock(&self.state);
        for key in keys {
            if state.in_flight.get(key).is_some_and(|batch| batch.id == id) {
                state.in_flight.remove(key);
            }
        }
        let Ok(values) = outcome else { return };
        let mut missing = 0;
        for key in keys {
            match values.get(key) {
                Some(value) => {
                    if let Some(cache) = state.cache.as_mut() {
                        cache.insert(key.clone(), value.clone());
                    }
                }
                None => missing += 1,
            }
        }
        drop(state);
        if missing > 0 {
            self.metrics.missing.increment(missing);
        }
    }
}
