//! The DataLoader.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_core::deadline;
use foldhash::quality::RandomState;
use futures_util::future::{BoxFuture, FutureExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::Cache;
use crate::engine::{self, Abandoned, Batch, Engine, Limits, Outcome, Owner, Wait, contain, lock};
use crate::error::Setting;
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

/// A loader's batch outcome: the batch function's answer, or why there is none.
type Answer<K, V, E> = Outcome<HashMap<K, V>, E>;

/// One of a loader's batches.
type LoaderBatch<K, V, E> = Arc<Batch<K, Answer<K, V, E>>>;

/// A waiter of one of a loader's batches.
type LoaderWait<K, V, F> = Wait<Shared<K, V, F>>;

/// The result of one load.
type Loaded<V, E> = Result<Option<V>, LoadError<E>>;

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
            .field("max_batch_size", &self.shared.engine.max_batch_size)
            .field("window", &self.shared.engine.window)
            .finish_non_exhaustive()
    }
}

/// A loader that does not keep its batch function alive: what a batch function holds to load
/// from its own loader (a tree, a graph) without a reference cycle. Made by
/// [`LoaderBuilder::build_cyclic`].
pub struct WeakLoader<K, V, F: BatchFn<K, V>> {
    shared: Weak<Shared<K, V, F>>,
}

impl<K, V, F: BatchFn<K, V>> WeakLoader<K, V, F> {
    /// The loader, unless it was dropped.
    #[must_use]
    pub fn upgrade(&self) -> Option<Loader<K, V, F>> {
        self.shared.upgrade().map(|shared| Loader { shared })
    }
}

impl<K, V, F: BatchFn<K, V>> Clone for WeakLoader<K, V, F> {
    fn clone(&self) -> Self {
        Self {
            shared: Weak::clone(&self.shared),
        }
    }
}

impl<K, V, F: BatchFn<K, V>> fmt::Debug for WeakLoader<K, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakLoader").finish_non_exhaustive()
    }
}

struct Shared<K, V, F: BatchFn<K, V>> {
    name: Arc<str>,
    batch_fn: F,
    engine: Engine,
    missing: MissingKey,
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
    settings: Settings,
}

/// What a builder sets, apart from the batch function.
#[derive(Debug)]
struct Settings {
    name: String,
    limits: Limits,
    cache: Option<usize>,
    missing: MissingKey,
    abandoned: Abandoned,
}

impl<F> fmt::Debug for LoaderBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoaderBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LoaderBuilder<()> {
    /// A builder for a loader whose batch function loads from the loader itself (a tree, a
    /// graph); finish it with [`build_cyclic`](Self::build_cyclic).
    pub fn cyclic() -> Self {
        Self::with(())
    }

    /// Checks the settings and builds the loader, giving `make` a [`WeakLoader`] of it to keep
    /// in the batch function.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use brisk_batch::{BatchFn, LoaderBuilder, WeakLoader};
    ///
    /// /// The size of the subtree under each node, in a tree where node `n` has the children
    /// /// `2n` and `2n + 1`, up to node 15.
    /// struct Subtrees(WeakLoader<u32, u32, Subtrees>);
    ///
    /// impl BatchFn<u32, u32> for Subtrees {
    ///     type Error = String;
    ///     async fn load(&self, nodes: &[u32]) -> Result<HashMap<u32, u32>, String> {
    ///         let loader = self.0.upgrade().ok_or("the loader was dropped")?;
    ///         let children: Vec<u32> =
    ///             nodes.iter().flat_map(|n| [2 * n, 2 * n + 1]).filter(|c| *c <= 15).collect();
    ///         // One batch per level of the tree, however many nodes it has.
    ///         let sizes = loader.load_many(children.iter().copied()).await;
    ///         let mut below: HashMap<u32, u32> = HashMap::new();
    ///         for (child, size) in children.iter().zip(sizes) {
    ///             let size = size.map_err(|e| e.to_string())?.unwrap_or(0);
    ///             *below.entry(child / 2).or_default() += size;
    ///         }
    ///         Ok(nodes.iter().map(|n| (*n, 1 + below.get(n).unwrap_or(&0))).collect())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let subtrees = LoaderBuilder::cyclic().name("subtrees").build_cyclic(Subtrees).expect("valid");
    /// assert_eq!(subtrees.load(1).await.unwrap(), Some(15));
    /// assert_eq!(subtrees.load(2).await.unwrap(), Some(7));
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`BuildError`], as [`build`](Self::build).
    pub fn build_cyclic<K, V, F: BatchFn<K, V>>(
        self,
        make: impl FnOnce(WeakLoader<K, V, F>) -> F,
    ) -> Result<Loader<K, V, F>, BuildError> {
        self.settings.validate()?;
        let shared = Arc::new_cyclic(|weak| {
            self.settings.shared(make(WeakLoader {
                shared: Weak::clone(weak),
            }))
        });
        Ok(Loader { shared })
    }
}

impl<F> LoaderBuilder<F> {
    fn with(batch_fn: F) -> Self {
        Self {
            batch_fn,
            settings: Settings {
                name: "loader".to_owned(),
                limits: Limits::default(),
                cache: None,
                missing: MissingKey::None,
                abandoned: Abandoned::Cancel,
            },
        }
    }

    /// The `loader` label of this loader's metrics and spans. Default: `"loader"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The most keys in one batch; a larger demand is split. Default: 500.
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.settings.limits.max_batch_size = max;
        self
    }

    /// Collect keys for this long after a batch's first key, instead of one scheduler turn.
    /// Larger batches, higher latency. A waiter whose deadline is nearer than the window makes
    /// its batch dispatch at once, and [`Loader::flush`] dispatches it at any time, so a very
    /// long window (up to `Duration::MAX`) with explicit flushes is manual dispatch.
    pub fn window(mut self, window: Duration) -> Self {
        self.settings.limits.window = Some(window);
        self
    }

    /// The most batches running at once; more wait for a slot. Default: 10. Batches requested
    /// from inside a batch function (a loader loading from itself or from another loader) take
    /// no slot, so recursion and cycles cannot deadlock on this bound; they hang from batches
    /// that took one. Loads made on tasks a batch function spawns count as nested only inside
    /// [`within_batch`](crate::within_batch).
    pub fn max_concurrent_batches(mut self, max: usize) -> Self {
        self.settings.limits.max_concurrent_batches = max;
        self
    }

    /// The most batches waiting for a slot: a load that would start a batch while this many
    /// wait fails with [`LoadError::Overloaded`]. Default: 1,000. Checked when a batch is
    /// created, against the batches already found waiting by their tasks, so one turn's burst
    /// (a large `load_many`) is not refused while slots are free.
    pub fn max_queued_batches(mut self, max: usize) -> Self {
        self.settings.limits.max_queued_batches = max;
        self
    }

    /// Keep up to `capacity` loaded values, oldest evicted first. Off by default: a loader
    /// made per request can turn it on freely, a shared one should think about staleness.
    pub fn cache(mut self, capacity: usize) -> Self {
        self.settings.cache = Some(capacity);
        self
    }

    /// What a key absent from the batch function's answer gives. Default: `Ok(None)`.
    pub fn missing(mut self, policy: MissingKey) -> Self {
        self.settings.missing = policy;
        self
    }

    /// What happens to a batch all of whose callers went away. Default: cancel it.
    pub fn abandoned(mut self, policy: Abandoned) -> Self {
        self.settings.abandoned = policy;
        self
    }

    /// Checks the settings and builds the loader.
    ///
    /// # Errors
    /// [`BuildError::Zero`] if a size, limit, capacity or the window is zero.
    pub fn build<K, V>(self) -> Result<Loader<K, V, F>, BuildError>
    where
        F: BatchFn<K, V>,
    {
        self.settings.validate()?;
        Ok(Loader {
            shared: Arc::new(self.settings.shared(self.batch_fn)),
        })
    }
}

impl Settings {
    fn validate(&self) -> Result<(), BuildError> {
        self.limits.validate()?;
        if self.cache == Some(0) {
            return Err(BuildError::Zero(Setting::CacheCapacity));
        }
        Ok(())
    }

    fn shared<K, V, F: BatchFn<K, V>>(self, batch_fn: F) -> Shared<K, V, F> {
        Shared {
            metrics: Metrics::new(&self.name),
            name: self.name.into(),
            batch_fn,
            engine: self.limits.engine(self.abandoned),
            missing: self.missing,
            state: Mutex::new(State {
                collecting: None,
                in_flight: HashMap::default(),
                cache: self.cache.map(Cache::new),
            }),
        }
    }
}

/// The key back, and what `enqueue` found for it.
type Found<K, V, F> = Result<(K, Enqueued<K, V, F>), LoadError<<F as BatchFn<K, V>>::Error>>;

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
        LoaderBuilder::with(batch_fn)
    }

    /// A handle that does not keep the loader alive.
    #[must_use]
    pub fn downgrade(&self) -> WeakLoader<K, V, F> {
        WeakLoader {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Loads one key, batched with every other load of the moment.
    ///
    /// `Ok(None)` when the batch function did not return the key (see [`MissingKey`]). Waits at
    /// most until the caller's deadline, if a `brisk_core::deadline::scope` set one; the batch
    /// itself runs under no caller's deadline.
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

    /// Loads many keys: one result per key, in the order given, each as [`load`](Self::load)
    /// would give it (so one key's error does not hide the others' values). Repeated keys are
    /// loaded once; more keys than `max_batch_size` are split into several batches; an empty
    /// list returns at once. Past the caller's deadline every key still waiting gets
    /// [`LoadError::Deadline`].
    ///
    /// The keys are collected when this is called and enqueued when the future is first polled.
    pub fn load_many(&self, keys: impl IntoIterator<Item = K>) -> LoadMany<'_, V, F::Error> {
        let keys: Vec<K> = keys.into_iter().collect();
        LoadMany {
            inner: Box::pin(self.collect(keys)),
        }
    }

    async fn collect(&self, keys: Vec<K>) -> Vec<Loaded<V, F::Error>> {
        let mut results: Vec<Option<Loaded<V, F::Error>>> = Vec::with_capacity(keys.len());
        let mut waits = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            match self.shared.enqueue(key) {
                Ok((key, Enqueued::Wait(wait))) => {
                    waits.push((index, key, wait));
                    results.push(None);
                }
                Ok((_, Enqueued::Cached(value))) => results.push(Some(Ok(Some(value)))),
                Err(err) => results.push(Some(Err(err))),
            }
        }
        let answered = async {
            // Each batch runs on its own task, so waiting for them one after another waits
            // only as long as the slowest.
            for (index, key, wait) in &mut waits {
                let outcome = wait.await;
                results[*index] = Some(self.shared.pick(&outcome, key));
            }
        };
        if deadline::current().is_some() {
            if let Err(elapsed) = Box::pin(deadline::bounded(Duration::MAX, answered)).await {
                for result in results.iter_mut().filter(|result| result.is_none()) {
                    *result = Some(Err(LoadError::Deadline(elapsed)));
                }
            }
        } else {
            answered.await;
        }
        drop(waits);
        results
            .into_iter()
            .map(|result| result.unwrap_or(Err(LoadError::Cancelled)))
            .collect()
    }

    /// Puts a value in the cache unless the key is cached already; true if it was stored. A
    /// batch already loading the key does not overwrite a primed value. Without a cache (the
    /// default) nothing is stored and this returns false.
    pub fn prime(&self, key: K, value: V) -> bool {
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        let Some(cache) = state.cache.as_mut() else {
            return false;
        };
        let collecting = state.collecting.as_ref().map(|(batch, _)| batch.id);
        contain::<_, ()>(|| {
            // The value a batch in flight fetches must not replace this one.
            if let Some(batch) = state.in_flight.remove(&key)
                && Some(batch.id) == collecting
            {
                batch.gaps.store(true, Ordering::Release);
            }
            cache.insert_if_absent(key, value)
        })
        .unwrap_or(false)
    }

    /// Forgets the cached value of `key`, and detaches it from any batch already running: the
    /// next load fetches it in a batch that has not started yet (the collecting one, or a new
    /// one), so it sees every write made before the clear.
    pub fn clear(&self, key: &K) {
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        let collecting = state.collecting.as_ref().map(|(batch, _)| batch.id);
        let _ = contain::<_, ()>(|| {
            if state
                .in_flight
                .get(key)
                .is_some_and(|batch| Some(batch.id) != collecting)
            {
                state.in_flight.remove(key);
            }
            if let Some(cache) = state.cache.as_mut() {
                cache.remove(key);
            }
        });
    }

    /// Forgets every cached value and detaches every key from the batches already running, as
    /// [`clear`](Self::clear) does for one.
    pub fn clear_all(&self) {
        let mut state = lock(&self.shared.state);
        let collecting = state.collecting.as_ref().map(|(batch, _)| batch.id);
        // No user code: the scan compares batch ids only.
        state
            .in_flight
            .retain(|_, batch| Some(batch.id) == collecting);
        if let Some(cache) = state.cache.as_mut() {
            cache.clear();
        }
    }

    /// Dispatches the collecting batch now instead of when its window closes.
    pub fn flush(&self) {
        // Sealed under the lock: the batch's task, finding it detached, takes its keys.
        if let Some((batch, keys)) = lock(&self.shared.state).collecting.take() {
            batch.seal(keys);
        }
    }
}

/// The future of [`Loader::load_many`]: one result per key, in the order given.
#[must_use = "futures do nothing unless polled"]
pub struct LoadMany<'a, V, E> {
    // Boxed, so that the future is `Send` whatever the keys borrowed when it was made (a batch
    // function loading `keys.iter().map(..)` from another loader).
    inner: BoxFuture<'a, Vec<Loaded<V, E>>>,
}

impl<V, E> Future for LoadMany<'_, V, E> {
    type Output = Vec<Loaded<V, E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<V, E> fmt::Debug for LoadMany<'_, V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadMany").finish_non_exhaustive()
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
    /// Moved into the loader while waiting; back for picking the result.
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
    type Output = Loaded<V, F::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let outcome = match &mut this.state {
                LoadState::Start => {
                    let Some(key) = this.key.take() else {
                        return this.finish(Err(LoadError::Cancelled));
                    };
                    this.state = match this.loader.shared.enqueue(key) {
                        Err(err) => return this.finish(Err(err)),
                        Ok((_, Enqueued::Cached(value))) => return this.finish(Ok(Some(value))),
                        Ok((key, Enqueued::Wait(wait))) => {
                            this.key = Some(key);
                            if deadline::current().is_some() {
                                LoadState::Bounded(Box::pin(deadline::bounded(Duration::MAX, wait)))
                            } else {
                                LoadState::Waiting(wait)
                            }
                        }
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
            let picked = match &this.key {
                Some(key) => this.loader.shared.pick(&outcome, key),
                None => Err(LoadError::Cancelled),
            };
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

impl<K, V, F> Shared<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    /// Finds `key` in the cache, in a batch in flight, or adds it to the collecting batch
    /// (starting one). Gives the key back for picking the result. A panic in the key's `Hash`,
    /// `Eq` or `Clone` fails this load alone and leaves the loader consistent.
    fn enqueue(self: &Arc<Self>, key: K) -> Found<K, V, F> {
        self.metrics.requested.increment(1);
        let requester = engine::requester();
        let mut state = lock(&self.state);
        let step = contain(|| self.enqueue_locked(&mut state, key, requester.as_ref()));
        drop(state);
        let (key, enqueued, started) = step??;
        if let (Some((batch, starter)), Enqueued::Wait(_)) = (started, &enqueued) {
            starter.start(self, &batch);
        }
        Ok((key, enqueued))
    }

    #[allow(clippy::type_complexity)]
    fn enqueue_locked(
        self: &Arc<Self>,
        state: &mut State<K, V, F::Error>,
        key: K,
        requester: Option<&Arc<engine::Lineage>>,
    ) -> Result<
        (
            K,
            Enqueued<K, V, F>,
            Option<(LoaderBatch<K, V, F::Error>, engine::Starter<Self>)>,
        ),
        LoadError<F::Error>,
    > {
        if let Some(value) = state.cache.as_ref().and_then(|cache| cache.get(&key)) {
            self.metrics.cached.increment(1);
            let value = value.clone();
            return Ok((key, Enqueued::Cached(value), None));
        }
        if let Some(batch) = state
            .in_flight
            .get(&key)
            .filter(|batch| batch.joinable() && batch.may_serve(requester))
        {
            self.metrics.deduplicated.increment(1);
            batch.serves(requester);
            let wait = Wait::new(self, batch);
            // A near deadline hurries the batch it joins, if that one still collects.
            if let Some((collecting, keys)) = &state.collecting
                && collecting.id == batch.id
                && self.engine.seal_now(batch, keys.len())
                && let Some((collecting, keys)) = state.collecting.take()
            {
                collecting.seal(keys);
            }
            return Ok((key, Enqueued::Wait(wait), None));
        }
        // User code (`Clone`, `Hash`, `Eq`) runs before anything changes, so a panic in it
        // leaves the state as it was.
        let (kept, batched) = (key.clone(), key.clone());
        let (batch, started) = match &state.collecting {
            // A collecting batch runs nothing yet, so nothing can wait on the requester through
            // it: always joinable.
            Some((batch, _)) => (Arc::clone(batch), None),
            None => {
                let (batch, starter) = engine::create(&**self)?;
                (batch, Some(starter))
            }
        };
        state.in_flight.insert(key, Arc::clone(&batch));
        // No user code from here on.
        let keys = match &mut state.collecting {
            Some((_, keys)) => {
                keys.push(batched);
                keys.len()
            }
            None => {
                state.collecting = Some((Arc::clone(&batch), vec![batched]));
                1
            }
        };
        batch.serves(requester);
        let wait = Wait::new(self, &batch);
        if self.engine.seal_now(&batch, keys)
            && let Some((_, keys)) = state.collecting.take()
        {
            batch.seal(keys);
        }
        Ok((
            kept,
            Enqueued::Wait(wait),
            started.map(|starter| (batch, starter)),
        ))
    }

    /// The result of one key from its batch's outcome. A panic in the key's `Hash`/`Eq` or the
    /// value's `Clone` fails this load alone.
    fn pick(&self, outcome: &Answer<K, V, F::Error>, key: &K) -> Loaded<V, F::Error> {
        match &**outcome {
            Ok(values) => match (contain(|| values.get(key).cloned())?, self.missing) {
                (Some(value), _) => Ok(Some(value)),
                (None, MissingKey::None) => Ok(None),
                (None, MissingKey::Error) => Err(LoadError::NotFound),
            },
            Err(err) => Err(err.clone()),
        }
    }

    /// Takes `keys` of batch `id` out of the in-flight map, except where a newer batch or a
    /// `clear` replaced them; with `values`, caches what the batch found for the keys still its
    /// own. Contains panics of user `Hash`/`Eq`/`Clone`: if one fires, every entry of the batch
    /// is removed by a scan that runs no user code, and nothing more is cached.
    fn release(&self, id: u64, keys: &[K], values: Option<&HashMap<K, V>>) -> u64 {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let released = contain::<_, ()>(|| {
            let mut missing = 0;
            for key in keys {
                let ours = state.in_flight.get(key).is_some_and(|batch| batch.id == id);
                if ours {
                    state.in_flight.remove(key);
                }
                let Some(values) = values else { continue };
                match values.get(key) {
                    Some(value) if ours => {
                        if let Some(cache) = state.cache.as_mut() {
                            cache.insert(key.clone(), value.clone());
                        }
                    }
                    Some(_) => {}
                    None => missing += 1,
                }
            }
            missing
        });
        released.unwrap_or_else(|_| {
            state.in_flight.retain(|_, batch| batch.id != id);
            0
        })
    }
}

/// `keys` without repeats, first occurrences kept in order. A panic in the keys' `Hash`/`Eq`
/// fails the batch as `Panicked` (the caller runs this inside the batch's task).
fn distinct<K: Hash + Eq + Clone>(keys: &[K]) -> Vec<K> {
    let mut seen =
        std::collections::HashSet::with_capacity_and_hasher(keys.len(), RandomState::default());
    keys.iter()
        .filter(|key| seen.insert(*key))
        .cloned()
        .collect()
}

/// Releases a running batch's keys however its future ends: finished, cancelled or panicked.
struct Running<'a, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    shared: &'a Shared<K, V, F>,
    id: u64,
    keys: Vec<K>,
    released: bool,
}

impl<K, V, F> Running<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    fn finish(&mut self, values: Option<&HashMap<K, V>>) {
        self.released = true;
        let missing = self.shared.release(self.id, &self.keys, values);
        if missing > 0 {
            self.shared.metrics.missing.increment(missing);
        }
    }
}

impl<K, V, F> Drop for Running<'_, K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    fn drop(&mut self) {
        if !self.released {
            self.shared.release(self.id, &self.keys, None);
        }
    }
}

impl<K, V, F> Owner for Shared<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: BatchFn<K, V>,
{
    type Item = K;
    type Done = HashMap<K, V>;
    type Error = F::Error;

    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn timed(&self) -> bool {
        self.metrics.queue_wait.is_enabled()
    }

    fn detach(&self, batch: &Batch<K, Answer<K, V, F::Error>>) -> Option<Vec<K>> {
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
        batch: &Arc<Batch<K, Answer<K, V, F::Error>>>,
        keys: Vec<K>,
    ) -> impl Future<Output = Result<HashMap<K, V>, LoadError<F::Error>>> + Send + 'static {
        let this = Arc::clone(self);
        let id = batch.id;
        let waited = Engine::age(batch);
        // A key detached while the batch collected (by `prime`) may have been added again.
        let repeats = batch.gaps.load(Ordering::Acquire);
        async move {
            let mut running = Running {
                shared: &this,
                id,
                keys,
                released: false,
            };
            if repeats {
                // Made apart first: a panic in `Hash`/`Eq` leaves the keys to be released.
                running.keys = distinct(&running.keys);
            }
            let keys = &running.keys;
            this.metrics.dispatched(keys.len(), waited);
            // Made only when a subscriber wants it: a disabled span still costs its creation
            // (and a trip through the `log` fallback), per batch.
            let span = if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug_span!("brisk.batch.dispatch", loader = %this.name, keys = keys.len())
            } else {
                tracing::Span::none()
            };
            // No clock read when nothing records the duration.
            let started = this.metrics.duration.is_enabled().then(Instant::now);
            // `load` is called inside the future, so a panic before it returns its own future is
            // caught too.
            let load = AssertUnwindSafe(async { this.batch_fn.load(keys).await }).catch_unwind();
            let result = load.instrument(span).await;
            if let Some(started) = started {
                this.metrics
                    .duration
                    .record(started.elapsed().as_secs_f64());
            }
            let outcome = match result {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(err)) => {
                    this.metrics.errors.increment(1);
                    Err(LoadError::Batch(Arc::new(err)))
                }
                Err(panic) => {
                    this.metrics.panics.increment(1);
                    Err(LoadError::panicked(&*panic))
                }
            };
            running.finish(outcome.as_ref().ok());
            outcome
        }
    }

    fn forget(&self, batch: &Arc<Batch<K, Answer<K, V, F::Error>>>) {
        let mut state = lock(&self.state);
        // A new waiter may have joined since the count reached zero.
        if batch.waiters() > 0 {
            return;
        }
        // Under the lock, so no load joins it from now on. Its keys go with it; its task,
        // cancelled, releases them (no user code runs here, in a waiter's `Drop`).
        batch.give_up();
        if let Some((current, _)) = &state.collecting
            && current.id == batch.id
            && let Some((_, keys)) = state.collecting.take()
        {
            batch.seal(keys);
        }
        drop(state);
        batch.cancel();
    }

    fn unrun(&self, batch: &Batch<K, Answer<K, V, F::Error>>, keys: Vec<K>) {
        self.release(batch.id, &keys, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Never answers.
    struct Never;

    impl BatchFn<u32, u32> for Never {
        type Error = std::convert::Infallible;
        async fn load(&self, _: &[u32]) -> Result<HashMap<u32, u32>, Self::Error> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_storm_leaves_nothing_in_flight() {
        let loader = Loader::builder(Never).max_batch_size(10).build().unwrap();
        let until = Instant::now() + Duration::from_millis(5);
        let loads = (0..1_000).map(|k| deadline::scope(until, loader.load(k)));
        let results = futures_util::future::join_all(loads).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(LoadError::Deadline(_))))
        );
        // Every batch was abandoned; their cancelled tasks release their own keys.
        for _ in 0..100 {
            let empty = lock(&loader.shared.state).in_flight.is_empty();
            if empty {
                break;
            }
            tokio::task::yield_now().await;
        }
        let state = lock(&loader.shared.state);
        assert!(
            state.in_flight.is_empty(),
            "{} keys left",
            state.in_flight.len()
        );
        assert!(state.collecting.is_none());
    }
}
