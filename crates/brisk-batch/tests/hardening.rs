//! Regressions from the independent review of brisk-batch (issue 8): each test failed on the
//! engine that let waiters drive their batch.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_batch::{
    BatchFn, BuildError, LoadError, Loader, LoaderBuilder, MissingKey, Setting, WeakLoader,
};
use brisk_core::deadline::{self, Bound};
use common::{Boom, Echo, Gated, taken, until};
use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tokio::time::Instant;

// 1. Every user callback is contained.

/// A batch function whose `load` panics before it returns its future.
struct PanicsEagerly;

impl BatchFn<u32, u32> for PanicsEagerly {
    type Error = Boom;
    #[allow(clippy::manual_async_fn)] // the point: a plain fn returning a future
    fn load(&self, keys: &[u32]) -> impl Future<Output = Result<HashMap<u32, u32>, Boom>> + Send {
        assert!(!keys.contains(&13), "unlucky key, before any future");
        let answer = keys.iter().map(|k| (*k, *k)).collect();
        async move { Ok(answer) }
    }
}

#[tokio::test]
async fn a_batch_function_panicking_before_its_future_fails_its_waiters_only() {
    let loader = Loader::new(PanicsEagerly);
    let (a, b) = tokio::join!(loader.load(13), loader.load(14));
    for result in [a, b] {
        match result {
            Err(LoadError::Panicked { message }) => assert!(message.contains("unlucky key")),
            other => panic!("expected Panicked, got {other:?}"),
        }
    }
    assert_eq!(
        loader.load(14).await.unwrap(),
        Some(14),
        "the loader goes on"
    );
}

/// While up, every `Touchy` key's `Hash` panics.
static HOSTILE: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Touchy(u32);

impl Hash for Touchy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        assert!(!HOSTILE.load(Ordering::SeqCst), "hostile Hash");
        self.0.hash(state);
    }
}

/// Raises `HOSTILE` in its first batch, so handing out that batch's results panics.
struct RaisesFlag(AtomicBool);

impl BatchFn<Touchy, u32> for RaisesFlag {
    type Error = Boom;
    async fn load(&self, keys: &[Touchy]) -> Result<HashMap<Touchy, u32>, Boom> {
        // Built before the flag goes up; from then on, every hash of these keys panics.
        let answer = keys.iter().map(|k| (k.clone(), k.0)).collect();
        if self.0.swap(false, Ordering::SeqCst) {
            HOSTILE.store(true, Ordering::SeqCst);
        }
        Ok(answer)
    }
}

#[tokio::test]
async fn a_panicking_key_hash_while_results_are_handed_out_fails_those_loads_only() {
    let loader = Loader::builder(RaisesFlag(AtomicBool::new(true)))
        .cache(16)
        .build()
        .unwrap();
    let (a, b) = tokio::join!(loader.load(Touchy(1)), loader.load(Touchy(2)));
    for result in [a, b] {
        assert!(
            matches!(&result, Err(LoadError::Panicked { message }) if message.contains("hostile")),
            "{result:?}"
        );
    }
    HOSTILE.store(false, Ordering::SeqCst);
    // Nothing stuck in flight or half-cached: the keys load again in a new batch.
    assert_eq!(loader.load(Touchy(1)).await.unwrap(), Some(1));
    // A hostile key at enqueue fails that load alone.
    HOSTILE.store(true, Ordering::SeqCst);
    assert!(matches!(
        loader.load(Touchy(3)).await,
        Err(LoadError::Panicked { .. })
    ));
    HOSTILE.store(false, Ordering::SeqCst);
    assert_eq!(loader.load(Touchy(4)).await.unwrap(), Some(4));
}

/// A value whose `Clone` panics.
#[derive(Debug, PartialEq)]
struct Fragile(u32);

impl Clone for Fragile {
    fn clone(&self) -> Self {
        assert!(self.0 != 13, "hostile Clone");
        Fragile(self.0)
    }
}

struct Fragiles;

impl BatchFn<u32, Fragile> for Fragiles {
    type Error = Boom;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, Fragile>, Boom> {
        Ok(keys.iter().map(|k| (*k, Fragile(*k))).collect())
    }
}

#[tokio::test]
async fn a_panicking_value_clone_fails_that_load_and_the_loader_goes_on() {
    let loader = Loader::builder(Fragiles).cache(16).build().unwrap();
    let (bad, good) = tokio::join!(loader.load(13), loader.load(12));
    assert!(matches!(bad, Err(LoadError::Panicked { .. })), "{bad:?}");
    assert_eq!(good.unwrap(), Some(Fragile(12)));
    assert_eq!(loader.load(12).await.unwrap(), Some(Fragile(12)));
}

// 2. A batch runs under no caller's deadline; each caller stops at its own.

/// Answers after 50 ms, bounded by `deadline::bounded` as brisk's pool checkout would be.
struct Slow(Arc<AtomicUsize>);

impl BatchFn<u32, u32> for Slow {
    type Error = deadline::Elapsed;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, deadline::Elapsed> {
        self.0.fetch_add(1, Ordering::SeqCst);
        deadline::bounded(
            Duration::from_secs(1),
            tokio::time::sleep(Duration::from_millis(50)),
        )
        .await?;
        Ok(keys.iter().map(|k| (*k, *k)).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn one_callers_short_deadline_does_not_fail_the_batch_for_the_others() {
    let batches = Arc::new(AtomicUsize::new(0));
    let loader = Loader::new(Slow(batches.clone()));
    let now = Instant::now();
    let short = deadline::scope(now + Duration::from_millis(10), loader.load(1));
    let long = deadline::scope(now + Duration::from_secs(10), loader.load(2));
    let (short, long) = tokio::join!(short, long);
    match short {
        Err(LoadError::Deadline(elapsed)) => assert_eq!(elapsed.bound(), Bound::Deadline),
        other => panic!("the short caller gets its own deadline error, not {other:?}"),
    }
    assert_eq!(
        long.unwrap(),
        Some(2),
        "the batch ran under no caller's budget"
    );
    assert_eq!(batches.load(Ordering::SeqCst), 1, "one batch for both");
}

#[cfg(feature = "tower")]
#[tokio::test(start_paused = true)]
async fn the_layers_inner_service_runs_under_no_callers_deadline() {
    use tower::{Layer, ServiceExt, service_fn};
    let slow = service_fn(|batch: Vec<u32>| async move {
        deadline::bounded(
            Duration::from_secs(1),
            tokio::time::sleep(Duration::from_millis(50)),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(batch)
    });
    let svc = brisk_batch::layer::BatchLayer::new().layer(slow);
    let now = Instant::now();
    let short = deadline::scope(now + Duration::from_millis(10), svc.clone().oneshot(1));
    let long = deadline::scope(now + Duration::from_secs(10), svc.clone().oneshot(2));
    let (short, long) = tokio::join!(short, long);
    assert!(matches!(short, Err(LoadError::Deadline(_))), "{short:?}");
    assert_eq!(long.unwrap(), 2);
}

// 3. Any waiter's request completes, whoever polls.

#[cfg(feature = "tower")]
#[tokio::test]
async fn a_later_call_completes_when_the_first_is_never_polled() {
    use tower::{Layer, Service, service_fn};
    let bulk = service_fn(|batch: Vec<u32>| async move { Ok::<_, String>(batch) });
    let mut svc = brisk_batch::layer::BatchLayer::new().layer(bulk);
    let first = svc.call(1);
    let second = svc.call(2);
    let answered = tokio::time::timeout(Duration::from_secs(10), second).await;
    assert_eq!(answered.expect("no hang").unwrap(), 2);
    drop(first);
}

// 4. Cache operations win over a running batch.

/// Reads the current value of each key from a shared "database" when the batch starts, then
/// waits for the gate.
#[derive(Clone)]
struct Database {
    rows: Arc<Mutex<HashMap<u32, String>>>,
    gate: Arc<Semaphore>,
    batches: Arc<AtomicUsize>,
}

impl BatchFn<u32, String> for Database {
    type Error = Boom;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, String>, Boom> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let read: HashMap<u32, String> = {
            let rows = self.rows.lock().unwrap();
            keys.iter()
                .filter_map(|k| rows.get(k).map(|v| (*k, v.clone())))
                .collect()
        };
        self.gate.acquire().await.unwrap().forget();
        Ok(read)
    }
}

fn database(value: &str) -> Database {
    Database {
        rows: Arc::new(Mutex::new(HashMap::from([(1, value.to_owned())]))),
        gate: Arc::new(Semaphore::new(0)),
        batches: Arc::default(),
    }
}

#[tokio::test]
async fn a_load_after_clear_sees_writes_made_before_the_clear() {
    for clear_all in [false, true] {
        let db = database("old");
        let loader = Loader::builder(db.clone()).cache(16).build().unwrap();
        let running = tokio::spawn({
            let loader = loader.clone();
            async move { loader.load(1).await }
        });
        until(|| db.batches.load(Ordering::SeqCst) == 1).await; // it read "old"
        db.rows.lock().unwrap().insert(1, "new".to_owned());
        if clear_all {
            loader.clear_all();
        } else {
            loader.clear(&1);
        }
        db.gate.add_permits(2);
        let after = loader.load(1).await.unwrap();
        assert_eq!(after.as_deref(), Some("new"), "clear_all: {clear_all}");
        assert_eq!(running.await.unwrap().unwrap().as_deref(), Some("old"));
        // The old batch did not write its value back over the new one.
        assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("new"));
        assert_eq!(db.batches.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn a_prime_during_a_batch_is_not_overwritten_by_it() {
    let db = database("fetched");
    let loader = Loader::builder(db.clone()).cache(16).build().unwrap();
    let running = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    until(|| db.batches.load(Ordering::SeqCst) == 1).await;
    assert!(loader.prime(1, "primed".to_owned()));
    db.gate.add_permits(1);
    assert_eq!(running.await.unwrap().unwrap().as_deref(), Some("fetched"));
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("primed"));
}

// 5. Extreme settings work instead of panicking.

#[tokio::test(start_paused = true)]
async fn an_endless_window_with_flush_and_a_huge_cache_capacity_work() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::MAX)
        .cache(usize::MAX)
        .max_batch_size(usize::MAX)
        .max_concurrent_batches(usize::MAX)
        .max_queued_batches(usize::MAX)
        .build()
        .unwrap();
    let mut pending = Box::pin(loader.load(1));
    assert!(common::poll_once(pending.as_mut()).await.is_pending());
    loader.flush();
    assert_eq!(pending.await.unwrap().as_deref(), Some("1"));
    assert_eq!(
        loader.load(1).await.unwrap().as_deref(),
        Some("1"),
        "cached"
    );
    assert_eq!(taken(&batches), vec![vec![1]]);
}

// 8. Errors a caller can match.

#[test]
fn build_errors_name_the_setting() {
    let zero = |b: LoaderBuilder<Echo<u32>>| b.build::<u32, String>().unwrap_err();
    let echo = || Loader::builder(Echo::<u32>::new().0);
    assert_eq!(
        zero(echo().max_batch_size(0)),
        BuildError::Zero(Setting::MaxBatchSize)
    );
    assert_eq!(
        zero(echo().cache(0)),
        BuildError::Zero(Setting::CacheCapacity)
    );
    assert_eq!(
        zero(echo().window(Duration::ZERO)),
        BuildError::Zero(Setting::Window)
    );
}

#[test]
fn a_load_outside_a_runtime_is_a_clear_error() {
    let loader = Loader::new(Echo::<u32>::new().0);
    let result = futures_util::FutureExt::now_or_never(loader.load(1));
    assert!(
        matches!(result, Some(Err(LoadError::NoRuntime))),
        "{result:?}"
    );
}

// 12. Flushed or filled batches answer at once, whoever polls.

#[tokio::test(start_paused = true)]
async fn a_lone_flushed_load_is_answered_without_waiting_out_the_window() {
    let (echo, _) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_secs(3600))
        .build()
        .unwrap();
    let start = Instant::now();
    let lone = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    tokio::task::yield_now().await; // the load is enqueued
    loader.flush();
    assert_eq!(lone.await.unwrap().unwrap().as_deref(), Some("1"));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_filled_by_another_task_answers_its_first_load_at_once() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_secs(3600))
        .max_batch_size(2)
        .build()
        .unwrap();
    let start = Instant::now();
    let first = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    tokio::task::yield_now().await;
    let second = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(2).await }
    });
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("1"));
    assert_eq!(second.await.unwrap().unwrap().as_deref(), Some("2"));
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(taken(&batches), vec![vec![1, 2]]);
}

// 13. Nested loads of waiters sharing a task form one batch.

#[tokio::test]
async fn nested_loads_from_one_task_form_one_batch_current_thread() {
    nested_loads_form_one_batch().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_loads_from_one_task_form_one_batch_multi_thread() {
    // On a worker thread, as a server runs its handlers (the test's own body is not on one).
    tokio::spawn(nested_loads_form_one_batch()).await.unwrap();
}

async fn nested_loads_form_one_batch() {
    for n in [3, 40] {
        let (echo, inner_batches) = Echo::new();
        let inner = Loader::new(echo);
        let (echo, outer_batches) = Echo::new();
        let outer = Loader::new(echo);
        let resolvers = (0..n).map(|k| {
            let (inner, outer) = (&inner, &outer);
            async move {
                let parent = outer.load(k).await.unwrap().unwrap();
                let child = inner.load(k + 1000).await.unwrap().unwrap();
                (parent, child)
            }
        });
        let resolved = join_all(resolvers).await;
        assert_eq!(resolved.len(), n as usize);
        assert_eq!(taken(&outer_batches).len(), 1, "{n} parents: one batch");
        assert_eq!(
            taken(&inner_batches).len(),
            1,
            "{n} children: one batch, got {:?}",
            taken(&inner_batches)
        );
    }
}

// 14. Recursive loads deeper than max_concurrent_batches progress.

/// The sum of a node and all below it, in a binary tree of the nodes 1..=LAST.
struct TreeSums(WeakLoader<u32, u64, TreeSums>);

const LAST: u32 = 255; // eight levels

impl BatchFn<u32, u64> for TreeSums {
    type Error = Boom;
    async fn load(&self, nodes: &[u32]) -> Result<HashMap<u32, u64>, Boom> {
        let loader = self.0.upgrade().ok_or(Boom("loader dropped".to_owned()))?;
        let children: Vec<u32> = nodes
            .iter()
            .flat_map(|n| [2 * n, 2 * n + 1])
            .filter(|c| *c <= LAST)
            .collect();
        // Borrowed keys, as a batch function has them.
        let below = loader.load_many(children.iter().copied()).await;
        let below: HashMap<u32, u64> = children
            .iter()
            .zip(below)
            .map(|(c, sum)| Ok((*c, sum.map_err(|e| Boom(e.to_string()))?.unwrap_or(0))))
            .collect::<Result<_, Boom>>()?;
        Ok(nodes
            .iter()
            .map(|n| {
                let child = |c: u32| below.get(&c).copied().unwrap_or(0);
                (*n, u64::from(*n) + child(2 * n) + child(2 * n + 1))
            })
            .collect())
    }
}

#[tokio::test]
async fn a_recursive_loader_deeper_than_its_slots_completes() {
    let sums = LoaderBuilder::cyclic()
        .max_concurrent_batches(1)
        .max_batch_size(4)
        .build_cyclic(TreeSums)
        .unwrap();
    // Spawned: the future of a load from a recursive loader is `Send + 'static`.
    let total = tokio::spawn(async move { sums.load(1).await });
    let total = tokio::time::timeout(Duration::from_secs(10), total)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(total.unwrap(), Some((1..=u64::from(LAST)).sum()));
}

// 15. load_many: one result per key, in order, with per-key errors.

#[tokio::test]
async fn load_many_answers_each_key_in_order_with_its_own_error() {
    let (echo, batches) = Echo::new();
    let loader = Loader::new(echo);
    let results = loader.load_many([3, 1, 3, 2]).await;
    let values: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        values,
        ["3", "1", "3", "2"].map(|v| Some(v.to_owned())).to_vec()
    );
    assert_eq!(
        taken(&batches),
        vec![vec![3, 1, 2]],
        "the repeat is loaded once"
    );

    struct OnlyEven;
    impl BatchFn<u32, u32> for OnlyEven {
        type Error = Boom;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, Boom> {
            Ok(keys
                .iter()
                .filter(|k| *k % 2 == 0)
                .map(|k| (*k, *k))
                .collect())
        }
    }
    let strict = Loader::builder(OnlyEven)
        .missing(MissingKey::Error)
        .build()
        .unwrap();
    let results = strict.load_many([2, 1, 4]).await;
    assert!(matches!(results[0], Ok(Some(2))));
    assert!(matches!(results[1], Err(LoadError::NotFound)));
    assert!(matches!(results[2], Ok(Some(4))));
}

#[tokio::test(start_paused = true)]
async fn load_many_past_the_deadline_fails_only_the_keys_still_waiting() {
    let gated = Gated::new();
    let loader = Loader::builder(gated.clone()).cache(4).build().unwrap();
    assert!(loader.prime(1, 100));
    let results = deadline::scope(
        Instant::now() + Duration::from_millis(10),
        loader.load_many([1, 2]),
    )
    .await;
    assert!(matches!(results[0], Ok(Some(100))));
    assert!(matches!(results[1], Err(LoadError::Deadline(_))));
}

// A batch whose runtime shuts down mid-run answers its waiters on other runtimes.

#[test]
fn a_batch_whose_runtime_shuts_down_fails_its_other_waiters_as_cancelled() {
    let gated = Gated::new(); // never opens: the batch is running when its runtime goes
    let loader = Loader::new(gated.clone());
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // On the first runtime: start a batch for key 1 and let it run.
    first.block_on(async {
        let mut load = Box::pin(loader.load(1));
        assert!(common::poll_once(load.as_mut()).await.is_pending());
        until(|| gated.running.load(Ordering::SeqCst) == 1).await;
        std::mem::forget(load); // its waiter stays registered
    });
    // On the second: join that batch (a duplicate key), then shut the first runtime down.
    let mut load = Box::pin(loader.load(1));
    second.block_on(async {
        assert!(common::poll_once(load.as_mut()).await.is_pending());
    });
    drop(first);
    let joined =
        second.block_on(async { tokio::time::timeout(Duration::from_secs(10), load).await });
    assert!(
        matches!(joined, Ok(Err(LoadError::Cancelled))),
        "{joined:?}"
    );
    // The loader goes on: a new batch on the second runtime.
    gated.gate.add_permits(1);
    let again = second.block_on(loader.load(1));
    assert_eq!(again.unwrap(), Some(2));
}
