//! A second adversarial review of brisk-cache, from its documentation only (docs/caching.md,
//! the rustdoc, DESIGN.md §2 and §6): writes racing writes and loads, stale values under many
//! callers, read-through with a batch loader, negative caching, bounds, runtimes, Redis faults
//! during writes, and metrics. Each test names the promise it attacks. Failing at the time of
//! writing: the three `concurrent_*_leave_both_tiers_*` tests (concurrent writes leave the local
//! and remote tiers holding different values).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_batch::{BatchFn, Loader};
use brisk_cache::{BreakerConfig, Cache, Error, LocalTier, RemoteError};
use brisk_core::deadline;
use brisk_metrics::catalog::{
    CACHE_BREAKER_STATE, CACHE_LOADS, CACHE_LOCAL_ENTRIES, CACHE_REQUESTS,
};
use brisk_metrics::testing::Capture;
use common::{connect, raw_get, redis};
use tokio::sync::Semaphore;
use tokio::time::{Instant, advance, sleep};

type R = Result<Option<String>, std::io::Error>;

fn ok(value: &str) -> impl Future<Output = R> + Send + 'static {
    let value = value.to_owned();
    async move { Ok(Some(value)) }
}

fn slow(after: Duration, value: &str) -> impl Future<Output = R> + Send + 'static {
    let value = value.to_owned();
    async move {
        sleep(after).await;
        Ok(Some(value))
    }
}

async fn slow_fail(after: Duration) -> R {
    sleep(after).await;
    Err(std::io::Error::other("db down"))
}

fn counted(runs: &Arc<AtomicUsize>, value: &str) -> impl Future<Output = R> + Send + 'static {
    let (runs, value) = (runs.clone(), value.to_owned());
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Some(value))
    }
}

fn gated(
    gate: &Arc<Semaphore>,
    runs: &Arc<AtomicUsize>,
    value: &str,
) -> impl Future<Output = R> + Send + 'static {
    let (gate, runs, value) = (gate.clone(), runs.clone(), value.to_owned());
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        let _open = gate.acquire().await;
        Ok(Some(value))
    }
}

async fn none() -> R {
    Ok(None)
}

async fn unreachable_load() -> R {
    panic!("this load must not run")
}

fn requests(capture: &Capture, name: &str, tier: &str, outcome: &str) -> u64 {
    capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", name), ("tier", tier), ("outcome", outcome)],
    )
}

fn loads(capture: &Capture, name: &str, outcome: &str) -> u64 {
    capture.counter(CACHE_LOADS.name, &[("cache", name), ("outcome", outcome)])
}

/// The shapes without Redis: in-memory remote tier, with and without a local tier.
fn memory_shapes(
    configure: impl Fn(common::Builder) -> common::Builder,
) -> Vec<(&'static str, Cache<u64, String>)> {
    vec![
        ("memory", configure(Cache::builder("m")).build().unwrap()),
        (
            "memory+local",
            configure(Cache::builder("ml"))
                .local(LocalTier::entries(1_000))
                .build()
                .unwrap(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// `get` without a loader and loads in progress
// ---------------------------------------------------------------------------------------------

/// docs: `get` without a loader: "the fresh value in the cache, if there is one, and nothing is
/// loaded"; errors "without a loader only `Error::Key`". A load of the key in progress that
/// fails is not this `get`'s load: its error must not become the `get`'s.
#[tokio::test(start_paused = true)]
async fn get_without_a_loader_is_not_failed_by_a_failing_load_in_progress() {
    for (shape, cache) in memory_shapes(|b| b) {
        let loading = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load(&1, slow_fail(Duration::from_secs(1)))
                    .await
            }
        });
        sleep(Duration::from_millis(10)).await;
        let got = cache.get(&1).await;
        assert!(got.is_ok(), "{shape}: get without a loader gave {got:?}");
        assert!(loading.await.unwrap().is_err());
    }
}

/// The same for a load in progress that passes the hard timeout: not `LoadTimeout`.
#[tokio::test(start_paused = true)]
async fn get_without_a_loader_is_not_failed_by_a_load_in_progress_timing_out() {
    for (shape, cache) in memory_shapes(|b| b.hard_timeout(Duration::from_secs(2))) {
        let loading = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load(&1, slow(Duration::from_secs(60), "v"))
                    .await
            }
        });
        sleep(Duration::from_millis(10)).await;
        let got = cache.get(&1).await;
        assert!(got.is_ok(), "{shape}: get without a loader gave {got:?}");
        let _ = loading.await;
    }
}

/// The same for a load in progress that panics: not `Panicked`.
#[tokio::test(start_paused = true)]
async fn get_without_a_loader_is_not_failed_by_a_panicking_load_in_progress() {
    for (shape, cache) in memory_shapes(|b| b) {
        let loading = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load(&1, async {
                        sleep(Duration::from_secs(1)).await;
                        panic!("loader bug");
                        #[allow(unreachable_code)]
                        Ok::<Option<String>, std::io::Error>(None)
                    })
                    .await
            }
        });
        sleep(Duration::from_millis(10)).await;
        let got = cache.get(&1).await;
        assert!(got.is_ok(), "{shape}: get without a loader gave {got:?}");
        let _ = loading.await;
    }
}

/// `get` "loads nothing": a miss from it caches no absence, so the next `get_or_load` loads.
#[tokio::test(start_paused = true)]
async fn get_without_a_loader_caches_no_absence() {
    for (shape, cache) in memory_shapes(|b| b) {
        assert_eq!(cache.get(&1).await.unwrap(), None, "{shape}");
        let runs = Arc::new(AtomicUsize::new(0));
        let got = cache.get_or_load(&1, counted(&runs, "v")).await.unwrap();
        assert_eq!(
            (got.as_deref(), runs.load(Ordering::SeqCst)),
            (Some("v"), 1),
            "{shape}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Negative caching
// ---------------------------------------------------------------------------------------------

/// An absence cached, then `set`: the set value is served, and for the TTL, not the negative TTL.
#[tokio::test(start_paused = true)]
async fn a_set_over_a_cached_absence_lives_the_full_ttl() {
    for (shape, cache) in memory_shapes(|b| {
        b.ttl(Duration::from_secs(60))
            .negative_ttl(Duration::from_secs(5))
    }) {
        assert_eq!(cache.get_or_load(&1, none()).await.unwrap(), None);
        cache.set(&1, "v".into()).await.unwrap();
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("v"),
            "{shape}"
        );
        advance(Duration::from_secs(20)).await;
        assert_eq!(
            cache
                .get_or_load(&1, unreachable_load())
                .await
                .unwrap()
                .as_deref(),
            Some("v"),
            "{shape}: 20 s after set, within its 60 s TTL"
        );
        advance(Duration::from_secs(41)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let _ = cache.get_or_load(&1, counted(&runs, "w")).await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{shape}: expired after its TTL"
        );
    }
}

/// A cached absence expires after the negative TTL, in the local tier too (whose own TTL is the
/// cache's 60 s by default).
#[tokio::test(start_paused = true)]
async fn a_cached_absence_expires_after_the_negative_ttl_in_every_tier() {
    for (shape, cache) in memory_shapes(|b| {
        b.ttl(Duration::from_secs(60))
            .negative_ttl(Duration::from_secs(5))
    }) {
        assert_eq!(cache.get_or_load(&1, none()).await.unwrap(), None);
        advance(Duration::from_secs(4)).await;
        assert_eq!(
            cache.get_or_load(&1, unreachable_load()).await.unwrap(),
            None,
            "{shape}"
        );
        advance(Duration::from_secs(2)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let got = cache.get_or_load(&1, counted(&runs, "now")).await.unwrap();
        assert_eq!(
            (got.as_deref(), runs.load(Ordering::SeqCst)),
            (Some("now"), 1),
            "{shape}"
        );
    }
}

/// `invalidate` removes a cached absence too: the next read loads.
#[tokio::test(start_paused = true)]
async fn invalidate_removes_a_cached_absence() {
    for (shape, cache) in memory_shapes(|b| b) {
        assert_eq!(cache.get_or_load(&1, none()).await.unwrap(), None);
        cache.invalidate(&1).await.unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let got = cache.get_or_load(&1, counted(&runs, "v")).await.unwrap();
        assert_eq!(
            (got.as_deref(), runs.load(Ordering::SeqCst)),
            (Some("v"), 1),
            "{shape}"
        );
    }
}

/// Negative caching with Redis: the absence is shared through Redis (another process's cache
/// does not load), and a `set` replaces it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_absence_in_redis_is_shared_and_replaced_by_set() {
    let server = redis();
    let a: Cache<u64, String> = Cache::builder("neg")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    let b: Cache<u64, String> = Cache::builder("neg")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    assert_eq!(a.get_or_load(&1, none()).await.unwrap(), None);
    common::eventually("the absence reached Redis", async || {
        raw_get(&server, "{brisk:neg:1:i:1}").await.is_some()
    })
    .await;
    assert_eq!(b.get_or_load(&1, unreachable_load()).await.unwrap(), None);
    a.set(&1, "v".into()).await.unwrap();
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("v"));
}

// ---------------------------------------------------------------------------------------------
// Bounds of the tiers
// ---------------------------------------------------------------------------------------------

/// A value "weighing more than a shard's share of the capacity is not kept locally": then the
/// lighter value the local tier held for the key must not be served in its place.
#[tokio::test(start_paused = true)]
async fn a_value_too_heavy_for_the_local_tier_does_not_leave_the_old_one_there() {
    let cache: Cache<u64, String> = Cache::builder("w")
        .local(LocalTier::weighted(1_000, |_: &u64, v: &String| {
            v.len() as u64
        }))
        .build()
        .unwrap();
    cache.set(&1, "light".into()).await.unwrap();
    let heavy = "h".repeat(100_000);
    cache.set(&1, heavy.clone()).await.unwrap();
    let got = cache.get(&1).await.unwrap();
    assert_eq!(got.as_ref().map(String::len), Some(100_000), "got {got:?}");
}

/// The in-memory remote tier is "at most `max_bytes`": a value too big for it is not kept, and
/// the older value it held for the key must not be served in its place.
#[tokio::test(start_paused = true)]
async fn a_value_too_big_for_the_in_memory_tier_does_not_leave_the_old_one_there() {
    let cache: Cache<u64, String> = Cache::builder("im").in_memory(4_096).build().unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("old"));
    let _ = cache.set(&1, "n".repeat(100_000)).await;
    let got = cache.get(&1).await.unwrap();
    assert_ne!(
        got.as_deref(),
        Some("old"),
        "the overwritten value came back"
    );
}

/// `in_memory(max_bytes)`: at most that many bytes of keys and values, under churn.
#[tokio::test(start_paused = true)]
async fn the_in_memory_tier_stays_within_max_bytes_under_churn() {
    let cache: Cache<u64, String> = Cache::builder("im").in_memory(200_000).build().unwrap();
    let value = "x".repeat(10_000);
    for key in 0..1_000 {
        cache.set(&key, value.clone()).await.unwrap();
    }
    let mut kept = 0;
    for key in 0..1_000 {
        if cache.get(&key).await.unwrap().is_some() {
            kept += 1;
        }
    }
    assert!(kept > 0, "nothing kept");
    assert!(
        kept * 10_000 <= 200_000,
        "{kept} values of 10 kB in a 200 kB tier"
    );
}

/// The entries gauge counts entries, not inserts: one key set many times is one entry.
#[tokio::test(start_paused = true)]
async fn the_local_entries_gauge_counts_a_rewritten_key_once() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("g")
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    });
    for i in 0..50 {
        cache.set(&1, format!("v{i}")).await.unwrap();
    }
    let _ = cache.get_or_load(&2, ok("w")).await.unwrap();
    cache.invalidate(&2).await.unwrap();
    let _ = cache.get_or_load(&2, ok("w")).await.unwrap();
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "g")]),
        Some(2.0)
    );
}

/// Invalidating keys the local tier does not hold leaves the gauge alone (never below zero).
#[tokio::test(start_paused = true)]
async fn invalidating_absent_keys_does_not_move_the_entries_gauge() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("g")
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    });
    cache.set(&1, "v".into()).await.unwrap();
    for key in 100..110 {
        cache.invalidate(&key).await.unwrap();
    }
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "g")]),
        Some(1.0)
    );
}

/// A value not kept locally (too heavy) is not counted as a local entry.
#[tokio::test(start_paused = true)]
async fn a_value_not_kept_locally_is_not_counted_in_the_entries_gauge() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("g")
            .local(LocalTier::weighted(1_000, |_: &u64, v: &String| {
                v.len() as u64
            }))
            .build()
            .unwrap()
    });
    cache.set(&1, "h".repeat(100_000)).await.unwrap();
    let _ = cache
        .get_or_load(&2, ok(&"h".repeat(100_000)))
        .await
        .unwrap();
    let gauge = capture
        .gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "g")])
        .unwrap_or(0.0);
    assert_eq!(gauge, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Writes racing writes: after they all returned, both tiers agree
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mix {
    Sets,
    SetsAndInvalidates,
    WriteThroughsAndSets,
}

const KEYS: u64 = 600;

/// Runs six concurrent writes on each of `KEYS` keys, then reads every key while the local tier
/// serves it and again once the local TTL has passed (the remote tier answers): no write came
/// in between, so the cache must answer the same. Returns the keys whose answer changed.
async fn race_writes(
    cache: &Cache<u64, String>,
    mix: Mix,
    local_ttl: Duration,
    base: u64,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for key in base..base + KEYS {
        for i in 0..6_usize {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                let value = format!("v{i}");
                match (mix, i % 2) {
                    (Mix::Sets, _)
                    | (Mix::SetsAndInvalidates, 0)
                    | (Mix::WriteThroughsAndSets, 1) => cache.set(&key, value).await,
                    (Mix::SetsAndInvalidates, _) => cache.invalidate(&key).await,
                    (Mix::WriteThroughsAndSets, _) => {
                        cache
                            .write_through(&key, value, async {
                                tokio::task::yield_now().await;
                                Ok::<(), std::io::Error>(())
                            })
                            .await
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let mut first = Vec::new();
    for key in base..base + KEYS {
        first.push(cache.get(&key).await.unwrap());
    }
    sleep(local_ttl * 3).await;
    let mut changed = Vec::new();
    for key in base..base + KEYS {
        let again = cache.get(&key).await.unwrap();
        if again != first[usize::try_from(key - base).unwrap()] {
            changed.push(format!(
                "key {key}: {:?} then {again:?}",
                first[usize::try_from(key - base).unwrap()]
            ));
        }
    }
    changed
}

async fn race_writes_on_every_local_shape(mix: Mix) {
    let server = redis();
    let local_ttl = Duration::from_millis(100);
    let local = || LocalTier::entries(10_000).ttl(local_ttl);
    let shapes = vec![
        (
            "memory+local",
            Cache::builder("rw").local(local()).build().unwrap(),
        ),
        (
            "redis+local",
            // 3,600 writes at once, six to a key: writes of one key take turns, so the last of
            // six waits for five round trips of a Redis this busy; the bound is not what is tested.
            Cache::builder("rw")
                .redis(connect(&server).await)
                .remote_timeout(Duration::from_secs(5))
                .local(local())
                .build()
                .unwrap(),
        ),
    ];
    let mut report = Vec::new();
    for (shape, cache) in shapes {
        // The race needs both worker threads at once: a few rounds, on fresh keys, until one shows.
        let mut changed = Vec::new();
        for round in 0..8 {
            changed = race_writes(&cache, mix, local_ttl, round * KEYS).await;
            if !changed.is_empty() {
                break;
            }
        }
        if !changed.is_empty() {
            report.push(format!(
                "{shape}: {} of {KEYS} keys (first: {})",
                changed.len(),
                changed[0]
            ));
        }
    }
    assert!(
        report.is_empty(),
        "{mix:?}: tiers disagree after the writes returned: {report:#?}"
    );
}

/// `set` vs `set`: each "stores value under key in both tiers"; whichever came last, both tiers
/// must hold it — not the local tier one value and the remote tier another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_leave_both_tiers_with_one_value() {
    race_writes_on_every_local_shape(Mix::Sets).await;
}

/// `set` vs `invalidate`: present in both tiers or in neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_and_invalidates_leave_both_tiers_agreeing() {
    race_writes_on_every_local_shape(Mix::SetsAndInvalidates).await;
}

/// `write_through` vs `set`: both tiers agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_write_throughs_and_sets_leave_both_tiers_agreeing() {
    race_writes_on_every_local_shape(Mix::WriteThroughsAndSets).await;
}

/// Many concurrent `set`s of one key on Redis: all succeed, and Redis ends with one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sets_of_one_key_all_succeed() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("ms")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.set(&1, format!("v{i}")).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let got = cache.get(&1).await.unwrap().unwrap();
    assert!(got.starts_with('v'), "{got}");
}

// ---------------------------------------------------------------------------------------------
// Writes racing a load that is writing Redis
// ---------------------------------------------------------------------------------------------

const RT: Duration = Duration::from_millis(300);
const SLACK: Duration = Duration::from_millis(250);

/// Starts a load of key 1 and lets it answer while Redis is paused, so that its Redis write
/// hangs. Returns once the caller has its answer.
async fn a_load_writing_a_paused_redis(
    cache: &Cache<u64, String>,
    server: &mut brisk_testkit::RedisServer,
) {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let cache = cache.clone();
        let load = gated(&gate, &runs, "loaded");
        async move { cache.get_or_load(&1, load).await }
    });
    for _ in 0..100 {
        if runs.load(Ordering::SeqCst) == 1 {
            break;
        }
        sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the load began");
    server.pause().unwrap();
    gate.add_permits(1);
    let started = Instant::now();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got.as_deref(), Some("loaded"));
    assert!(
        started.elapsed() < RT / 2,
        "the load answers before writing Redis"
    );
}

fn paused_redis_cache(
    server: &brisk_testkit::RedisServer,
    redis: brisk_pool::redis_source::Multiplexed,
) -> Cache<u64, String> {
    let _ = server;
    Cache::builder("lw")
        .redis(redis)
        .remote_timeout(RT)
        .breaker(BreakerConfig {
            failures: 1_000,
            open_for: Duration::from_millis(500),
        })
        .build()
        .unwrap()
}

/// docs table: paused Redis — `set` is "`Error::Remote` after at most `remote_timeout` (twice
/// that if a load of the key is writing Redis at that moment)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_while_a_load_writes_a_paused_redis_fails_within_twice_the_remote_timeout() {
    let mut server = redis();
    let cache = paused_redis_cache(&server, connect(&server).await);
    a_load_writing_a_paused_redis(&cache, &mut server).await;
    let started = Instant::now();
    let outcome = cache.set(&1, "new".into()).await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(matches!(outcome, Err(Error::Remote(_))), "{outcome:?}");
    assert!(
        took <= RT * 2 + SLACK,
        "set took {took:?}; remote_timeout {RT:?}"
    );
}

/// The same for `invalidate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_while_a_load_writes_a_paused_redis_fails_within_twice_the_remote_timeout() {
    let mut server = redis();
    let cache = paused_redis_cache(&server, connect(&server).await);
    a_load_writing_a_paused_redis(&cache, &mut server).await;
    let started = Instant::now();
    let outcome = cache.invalidate(&1).await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(matches!(outcome, Err(Error::Remote(_))), "{outcome:?}");
    assert!(took <= RT * 2 + SLACK, "invalidate took {took:?}");
}

/// Twenty concurrent `set`s while the load writes: each within the bound, none hangs behind the
/// others' waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_while_a_load_writes_a_paused_redis_each_stay_within_the_bound() {
    let mut server = redis();
    let cache = paused_redis_cache(&server, connect(&server).await);
    a_load_writing_a_paused_redis(&cache, &mut server).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = cache.set(&1, format!("s{i}")).await;
                (outcome, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (outcome, took) = task.await.unwrap();
        assert!(matches!(outcome, Err(Error::Remote(_))), "{outcome:?}");
        slowest = slowest.max(took);
    }
    server.resume().unwrap();
    assert!(slowest <= RT * 2 + SLACK, "slowest set took {slowest:?}");
}

/// Redis paused only briefly (less than the remote timeout) while a load writes: the `set` lets
/// the load's write land, then its own — it succeeds, and its value is what Redis keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_after_a_load_writing_a_briefly_paused_redis_lands_last() {
    let mut server = redis();
    let rt = Duration::from_millis(1_500);
    let cache: Cache<u64, String> = Cache::builder("lw")
        .redis(connect(&server).await)
        .remote_timeout(rt)
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let cache = cache.clone();
        let load = gated(&gate, &runs, "loaded");
        async move { cache.get_or_load(&1, load).await }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        sleep(Duration::from_millis(5)).await;
    }
    server.pause().unwrap();
    gate.add_permits(1);
    assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some("loaded"));
    let resumer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.resume().unwrap();
        server
    });
    let started = Instant::now();
    let outcome = cache.set(&1, "new".into()).await;
    let took = started.elapsed();
    let server = resumer.join().unwrap();
    outcome.unwrap();
    assert!(took < rt * 2, "set took {took:?}");
    sleep(Duration::from_millis(200)).await;
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("new"));
    let raw = raw_get(&server, "{brisk:lw:1:i:1}").await.unwrap();
    assert!(raw.windows(3).any(|w| w == b"new"), "Redis holds {raw:?}");
}

// ---------------------------------------------------------------------------------------------
// Redis faults during writes; the breaker
// ---------------------------------------------------------------------------------------------

/// `write_through` on a paused Redis: the cache update is a write to Redis like `set`, so
/// `Error::Remote` after at most the remote timeout once the source write is done; and the
/// cache never serves the old value afterwards in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_on_a_paused_redis_reports_within_the_remote_timeout_and_drops_the_old_value()
{
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("wt")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .remote_timeout(RT)
        .breaker(BreakerConfig {
            failures: 1_000,
            open_for: Duration::from_millis(500),
        })
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    server.pause().unwrap();
    let wrote = Arc::new(std::sync::Mutex::new(None));
    let started = Instant::now();
    let outcome = cache
        .write_through(&1, "new".into(), {
            let wrote = wrote.clone();
            async move {
                *wrote.lock().unwrap() = Some(Instant::now());
                Ok::<(), std::io::Error>(())
            }
        })
        .await;
    let took = started.elapsed();
    let got = cache.get(&1).await.unwrap();
    server.resume().unwrap();
    assert!(matches!(outcome, Err(Error::Remote(_))), "{outcome:?}");
    assert!(
        took <= RT + SLACK,
        "write_through took {took:?}; remote_timeout {RT:?}"
    );
    assert_ne!(
        got.as_deref(),
        Some("old"),
        "the old value survived a successful write"
    );
}

/// Redis killed while the source write runs: the source write succeeded, the cache reports
/// `Error::Remote`; after a restart the next write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_with_redis_killed_midway_reports_and_recovers() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("wk")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .remote_timeout(RT)
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let writing = tokio::spawn({
        let (cache, gate) = (cache.clone(), gate.clone());
        async move {
            cache
                .write_through(&1, "new".into(), async move {
                    let _open = gate.acquire().await;
                    Ok::<(), std::io::Error>(())
                })
                .await
        }
    });
    sleep(Duration::from_millis(50)).await;
    server.kill().unwrap();
    gate.add_permits(1);
    let outcome = writing.await.unwrap();
    assert!(matches!(outcome, Err(Error::Remote(_))), "{outcome:?}");
    assert_ne!(cache.get(&1).await.unwrap().as_deref(), Some("old"));
    server.restart().unwrap();
    let started = Instant::now();
    loop {
        if cache.set(&1, "after".into()).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no write landed 3 s after the restart"
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("after"));
}

/// docs table: Redis "back — the next probe closes the breaker (within about half a second)":
/// after a restart, writes succeed again within about half a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_writes_succeed_within_about_half_a_second() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("rs")
        .redis(connect(&server).await)
        .remote_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    server.kill().unwrap();
    for key in 0..10 {
        let _ = cache.get(&key).await.unwrap();
    }
    assert!(matches!(
        cache.set(&1, "w".into()).await,
        Err(Error::Remote(RemoteError::BreakerOpen))
    ));
    server.restart().unwrap();
    let started = Instant::now();
    loop {
        if cache.set(&1, "back".into()).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not back within 5 s"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_000),
        "writes came back {took:?} after the restart"
    );
}

/// docs: an open breaker lets "one probe" through after `open_for`: concurrent reads meanwhile
/// skip Redis rather than each waiting its remote timeout on a paused Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_breaker_lets_one_probe_through_and_the_others_skip_redis() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("hp")
        .redis(connect(&server).await)
        .remote_timeout(RT)
        .breaker(BreakerConfig {
            failures: 2,
            open_for: Duration::from_millis(300),
        })
        .build()
        .unwrap();
    server.pause().unwrap();
    for key in 0..2 {
        let _ = cache.get(&key).await.unwrap();
    }
    sleep(Duration::from_millis(400)).await;
    let tasks: Vec<_> = (10..30_u64)
        .map(|key| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let _ = cache.get(&key).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut waited = 0;
    for task in tasks {
        if task.await.unwrap() >= RT / 2 {
            waited += 1;
        }
    }
    server.resume().unwrap();
    assert_eq!(waited, 1, "{waited} of 20 reads waited on the paused Redis");
}

/// `brisk_cache_breaker_state`: 2 open, 1 half-open (a probe in flight), 0 closed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_state_gauge_goes_open_half_open_closed() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("bs")
            .redis(redis)
            .remote_timeout(RT)
            .breaker(BreakerConfig {
                failures: 2,
                open_for: Duration::from_millis(300),
            })
            .build()
            .unwrap()
    });
    let state = || capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "bs")]);
    server.pause().unwrap();
    for key in 0..2 {
        let _ = cache.get(&key).await.unwrap();
    }
    assert_eq!(state(), Some(2.0), "open");
    sleep(Duration::from_millis(400)).await;
    let probe = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&5).await }
    });
    sleep(Duration::from_millis(100)).await;
    let during = state();
    server.resume().unwrap();
    probe.await.unwrap().unwrap();
    let mut closed = false;
    for key in 0..50 {
        let _ = cache.get(&(100 + key)).await;
        if state() == Some(0.0) {
            closed = true;
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(during, Some(1.0), "half-open while the probe waits");
    assert!(closed, "closed after the probe succeeded: {:?}", state());
}

// ---------------------------------------------------------------------------------------------
// Stale values and soft timeouts under many callers
// ---------------------------------------------------------------------------------------------

fn stale_shapes(capture: &Capture) -> Vec<(&'static str, &'static str, Cache<u64, String>)> {
    capture.run(|| {
        let b = |name: &str| {
            Cache::builder(name)
                .ttl(Duration::from_secs(1))
                .stale_for(Duration::from_secs(60))
                .soft_timeout(Duration::from_millis(100))
                .hard_timeout(Duration::from_secs(5))
        };
        vec![
            ("memory", "s", b("s").build().unwrap()),
            (
                "memory+local",
                "sl",
                b("sl").local(LocalTier::entries(100)).build().unwrap(),
            ),
        ]
    })
}

/// A hundred callers past the TTL with a slow reload: each gets the stale value at the soft
/// timeout, the loader runs once, and its value then fills the cache.
#[tokio::test(start_paused = true)]
async fn a_hundred_callers_get_the_stale_value_at_the_soft_timeout_and_one_reload() {
    let capture = Capture::new();
    for (shape, _, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                let runs = runs.clone();
                tokio::spawn(async move {
                    let got = cache
                        .get_or_load(&1, async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            sleep(Duration::from_secs(1)).await;
                            Ok::<_, std::io::Error>(Some("new".to_owned()))
                        })
                        .await;
                    (got, Instant::now())
                })
            })
            .collect();
        for task in tasks {
            let (got, at) = task.await.unwrap();
            assert_eq!(got.unwrap().as_deref(), Some("old"), "{shape}");
            assert_eq!(at - started, Duration::from_millis(100), "{shape}");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{shape}");
        sleep(Duration::from_secs(1)).await;
        assert_eq!(
            cache
                .get_or_load(&1, unreachable_load())
                .await
                .unwrap()
                .as_deref(),
            Some("new"),
            "{shape}"
        );
    }
}

/// A joiner that arrives after the first caller was already served the stale value waits at
/// most the soft timeout from its own arrival, not until the reload ends.
#[tokio::test(start_paused = true)]
async fn a_late_joiner_waits_at_most_its_own_soft_timeout() {
    let capture = Capture::new();
    for (shape, _, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let first = cache
            .get_or_load(&1, slow(Duration::from_secs(3), "new"))
            .await
            .unwrap();
        assert_eq!(first.as_deref(), Some("old"), "{shape}");
        sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let late = cache.get_or_load(&1, unreachable_load()).await.unwrap();
        assert_eq!(late.as_deref(), Some("old"), "{shape}");
        assert!(
            started.elapsed() <= Duration::from_millis(100),
            "{shape}: the late joiner waited {:?}",
            started.elapsed()
        );
    }
}

/// A background reload (past the soft timeout) that then fails caches no error: the next read
/// is served the stale value again and loads again.
#[tokio::test(start_paused = true)]
async fn a_background_reload_that_fails_leaves_the_stale_value_and_the_next_read_reloads() {
    let capture = Capture::new();
    for (shape, _, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, slow_fail(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("old"), "{shape}");
        sleep(Duration::from_secs(2)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let got = cache
            .get_or_load(&1, counted(&runs, "fresh"))
            .await
            .unwrap();
        assert_eq!(
            (got.as_deref(), runs.load(Ordering::SeqCst)),
            (Some("fresh"), 1),
            "{shape}"
        );
    }
}

/// docs: `invalidate` wins over a load in progress — a background reload (past the soft
/// timeout) included: it stores nothing.
#[tokio::test(start_paused = true)]
async fn an_invalidate_during_a_background_reload_wins() {
    let capture = Capture::new();
    for (shape, _, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, slow(Duration::from_secs(1), "refreshed"))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("old"));
        cache.invalidate(&1).await.unwrap();
        sleep(Duration::from_secs(2)).await;
        assert_eq!(
            cache.get(&1).await.unwrap(),
            None,
            "{shape}: the reload stored after invalidate"
        );
    }
}

/// docs: `outcome="stale"` "under the tier a stale value was served from": with a local tier
/// every caller served stale counts once (the one that read the remote tier may count its stale value
/// there); without a local tier, all under `remote`.
#[tokio::test(start_paused = true)]
async fn stale_values_are_counted_under_their_tier_once_per_caller() {
    let capture = Capture::new();
    for (shape, name, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .get_or_load(&1, slow_fail(Duration::from_millis(10)))
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().as_deref(), Some("old"));
        }
        let (local, remote) = (
            requests(&capture, name, "local", "stale"),
            requests(&capture, name, "remote", "stale"),
        );
        assert_eq!(
            local + remote,
            10,
            "{shape}: local {local}, remote {remote}"
        );
        if shape == "memory" {
            assert_eq!(local, 0, "{shape}");
        }
    }
}

/// Load metrics for a reload past the soft timeout: it is one load, `loaded`; one past the hard
/// timeout is one `timeout`.
#[tokio::test(start_paused = true)]
async fn a_reload_past_the_soft_timeout_counts_one_load() {
    let capture = Capture::new();
    for (shape, name, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        for _ in 0..5 {
            let got = cache
                .get_or_load(&1, slow(Duration::from_secs(1), "new"))
                .await
                .unwrap();
            assert_eq!(got.as_deref(), Some("old"));
        }
        sleep(Duration::from_secs(2)).await;
        assert_eq!(
            loads(&capture, name, "loaded"),
            2,
            "{shape}: the first load and the reload"
        );
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, slow(Duration::from_secs(60), "never"))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("new"));
        sleep(Duration::from_secs(6)).await;
        assert_eq!(loads(&capture, name, "timeout"), 1, "{shape}");
    }
}

/// docs: `tier="remote"` is counted "one per read that got past the local tier and found no load
/// in progress": joiners of a load are not remote lookups.
#[tokio::test(start_paused = true)]
async fn joiners_of_a_load_are_not_counted_as_remote_lookups() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| Cache::builder("j").build().unwrap());
    let first = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(&1, slow(Duration::from_secs(1), "v"))
                .await
        }
    });
    sleep(Duration::from_millis(10)).await;
    let joiners: Vec<_> = (0..9)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get_or_load(&1, unreachable_load()).await })
        })
        .collect();
    for joiner in joiners {
        assert_eq!(joiner.await.unwrap().unwrap().as_deref(), Some("v"));
    }
    first.await.unwrap().unwrap();
    let remote: u64 = ["hit", "miss", "error"]
        .iter()
        .map(|o| requests(&capture, "j", "remote", o))
        .sum();
    assert_eq!(remote, 1);
    assert_eq!(loads(&capture, "j", "loaded"), 1);
}

// ---------------------------------------------------------------------------------------------
// Read-through
// ---------------------------------------------------------------------------------------------

/// Read-through "as `get_or_load` with it": stale values and the soft timeout apply.
#[tokio::test(start_paused = true)]
async fn read_through_serves_stale_at_the_soft_timeout_and_refreshes() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<u64, String> = Cache::builder("rt")
        .ttl(Duration::from_secs(1))
        .stale_for(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100))
        .local(LocalTier::entries(10))
        .loader({
            let calls = calls.clone();
            move |id: u64| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n > 0 {
                        sleep(Duration::from_secs(1)).await;
                    }
                    Ok::<_, std::io::Error>(Some(format!("{id}#{n}")))
                }
            }
        })
        .build()
        .unwrap();
    assert_eq!(cache.get(&7).await.unwrap().as_deref(), Some("7#0"));
    advance(Duration::from_secs(2)).await;
    let started = Instant::now();
    assert_eq!(cache.get(&7).await.unwrap().as_deref(), Some("7#0"));
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    sleep(Duration::from_secs(1)).await;
    assert_eq!(cache.get(&7).await.unwrap().as_deref(), Some("7#1"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// docs: "callers get `Error::Load`, whose `source()` is your error itself" — through a
/// registered loader too.
#[tokio::test(start_paused = true)]
async fn read_through_errors_carry_the_loaders_own_error() {
    #[derive(Debug)]
    struct Mine;
    impl std::fmt::Display for Mine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("mine")
        }
    }
    impl std::error::Error for Mine {}
    let cache: Cache<u64, String> = Cache::builder("rte")
        .loader(|_id: u64| async { Err::<Option<String>, _>(Mine) })
        .build()
        .unwrap();
    let err = cache.get(&1).await.unwrap_err();
    assert!(matches!(err, Error::Load(_)), "{err:?}");
    let source = std::error::Error::source(&err).expect("a source");
    assert!(
        source.downcast_ref::<Mine>().is_some(),
        "source is {source:?}"
    );
}

/// Read-through with `write_through` and negative caching: an absence, then a write, then reads
/// that never reach the loader again.
#[tokio::test(start_paused = true)]
async fn read_through_with_an_absence_then_write_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<u64, String> = Cache::builder("rtw")
        .local(LocalTier::entries(10))
        .loader({
            let calls = calls.clone();
            move |_id: u64| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<Option<String>, std::io::Error>(None) }
            }
        })
        .build()
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.get(&1).await.unwrap(), None);
    cache
        .write_through(&1, "written".into(), async { Ok::<(), std::io::Error>(()) })
        .await
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("written"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Read-through under an expired deadline: `Error::Deadline` at once, no hang, and the load
/// still fills the cache for later callers.
#[tokio::test(start_paused = true)]
async fn read_through_under_a_short_deadline_times_out_and_the_load_fills_the_cache() {
    let cache: Cache<u64, String> = Cache::builder("rtd")
        .loader(|id: u64| async move {
            sleep(Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(Some(format!("v{id}")))
        })
        .build()
        .unwrap();
    let outcome = deadline::scope(Instant::now() + Duration::from_millis(50), cache.get(&1)).await;
    assert!(matches!(outcome, Err(Error::Deadline(_))), "{outcome:?}");
    sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v1"));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

// --- a brisk-batch Loader behind the cache --------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Fail,
    Panic,
    Hang,
}

#[derive(Clone)]
struct Flaky {
    mode: Arc<std::sync::Mutex<Mode>>,
    batches: Arc<AtomicUsize>,
}

impl BatchFn<u64, String> for Flaky {
    type Error = std::io::Error;

    async fn load(&self, ids: &[u64]) -> Result<HashMap<u64, String>, Self::Error> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Ok => Ok(ids.iter().map(|id| (*id, format!("name {id}"))).collect()),
            Mode::Fail => Err(std::io::Error::other("batch failed")),
            Mode::Panic => panic!("batch panicked"),
            Mode::Hang => {
                sleep(Duration::from_secs(3_600)).await;
                Ok(HashMap::new())
            }
        }
    }
}

fn batched(
    configure: impl FnOnce(common::Builder) -> common::Builder,
) -> (Cache<u64, String>, Flaky) {
    let flaky = Flaky {
        mode: Arc::new(std::sync::Mutex::new(Mode::Ok)),
        batches: Arc::default(),
    };
    let loader = Loader::builder(flaky.clone())
        .name("flaky")
        .build()
        .unwrap();
    let cache = configure(Cache::builder("bl"))
        .loader(move |id: u64| {
            let loader = loader.clone();
            async move { loader.load(id).await }
        })
        .build()
        .unwrap();
    (cache, flaky)
}

async fn get_all(cache: &Cache<u64, String>, ids: &[u64]) -> Vec<Result<Option<String>, Error>> {
    futures_util::future::join_all(ids.iter().map(|id| cache.get(id))).await
}

/// A batch that fails: every key's caller gets `Error::Load`, nothing is cached, and the next
/// reads load again (one batch).
#[tokio::test(start_paused = true)]
async fn a_failing_batch_fails_each_key_and_is_not_cached() {
    let (cache, flaky) = batched(|b| b);
    *flaky.mode.lock().unwrap() = Mode::Fail;
    for got in get_all(&cache, &[1, 2, 3]).await {
        assert!(matches!(got, Err(Error::Load(_))), "{got:?}");
    }
    assert_eq!(flaky.batches.load(Ordering::SeqCst), 1);
    *flaky.mode.lock().unwrap() = Mode::Ok;
    let got: Vec<_> = get_all(&cache, &[1, 2, 3])
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        [
            Some("name 1".into()),
            Some("name 2".into()),
            Some("name 3".into())
        ]
    );
    assert_eq!(flaky.batches.load(Ordering::SeqCst), 2);
}

/// A batch that panics: every caller gets an error (no hang), and the keys load again.
#[tokio::test(start_paused = true)]
async fn a_panicking_batch_fails_each_key_and_the_keys_recover() {
    let (cache, flaky) = batched(|b| b);
    *flaky.mode.lock().unwrap() = Mode::Panic;
    for got in get_all(&cache, &[1, 2, 3]).await {
        assert!(got.is_err(), "{got:?}");
    }
    *flaky.mode.lock().unwrap() = Mode::Ok;
    for got in get_all(&cache, &[1, 2, 3]).await {
        assert!(got.unwrap().is_some());
    }
}

/// A batch that hangs: the hard timeout bounds each key's load (`LoadTimeout`), and once the
/// database answers again the keys load.
#[tokio::test(start_paused = true)]
async fn a_hanging_batch_is_cut_by_the_hard_timeout_and_the_keys_recover() {
    let (cache, flaky) = batched(|b| b.hard_timeout(Duration::from_secs(2)));
    *flaky.mode.lock().unwrap() = Mode::Hang;
    let started = Instant::now();
    for got in get_all(&cache, &[1, 2, 3]).await {
        assert!(matches!(got, Err(Error::LoadTimeout { .. })), "{got:?}");
    }
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    *flaky.mode.lock().unwrap() = Mode::Ok;
    let started = Instant::now();
    for got in get_all(&cache, &[1, 2, 3]).await {
        assert!(got.unwrap().is_some());
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
}

/// Batches failing past the TTL with stale values at hand: each key serves its own stale value.
#[tokio::test(start_paused = true)]
async fn a_failing_batch_past_the_ttl_serves_each_keys_stale_value() {
    let (cache, flaky) = batched(|b| {
        b.ttl(Duration::from_secs(1))
            .stale_for(Duration::from_secs(60))
            .local(LocalTier::entries(10))
    });
    let _ = get_all(&cache, &[1, 2, 3]).await;
    advance(Duration::from_secs(2)).await;
    for mode in [Mode::Fail, Mode::Panic] {
        *flaky.mode.lock().unwrap() = mode;
        let got: Vec<_> = get_all(&cache, &[1, 2, 3])
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            [
                Some("name 1".into()),
                Some("name 2".into()),
                Some("name 3".into())
            ]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Runtimes, clones, drops
// ---------------------------------------------------------------------------------------------

/// A cache built outside any runtime (in `main` before the runtime starts), then used inside
/// one, and then from a second runtime: clones share everything.
#[test]
fn a_cache_built_outside_a_runtime_works_inside_two() {
    let cache: Cache<u64, String> = Cache::builder("out")
        .ttl(Duration::from_secs(60))
        .stale_for(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(50))
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(cache.get_or_load(&1, ok("v"))).unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    drop(rt);
    let clone = cache.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert_eq!(clone.get(&1).await.unwrap().as_deref(), Some("v"));
        assert_eq!(
            clone.get_or_load(&2, ok("w")).await.unwrap().as_deref(),
            Some("w")
        );
    });
    assert_eq!(rt.block_on(cache.get(&2)).unwrap().as_deref(), Some("w"));
}

/// DESIGN §6: no panic on any input — in a runtime built without timers, a load must come back
/// as a value or an error, not panic the caller.
#[test]
fn a_runtime_without_timers_gets_an_answer_not_a_panic() {
    let cache: Cache<u64, String> = Cache::builder("nt").build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(cache.get_or_load(&1, ok("v")))
    }));
    assert!(
        outcome.is_ok(),
        "get_or_load panicked in a runtime without timers"
    );
}

/// The cache dropped while its load runs (every caller gone): the load still fills Redis, where
/// another process's cache finds it ("what it loads still fills the cache").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_outliving_its_cache_still_fills_redis() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("dr")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let caller = tokio::spawn({
        let cache = cache.clone();
        let load = gated(&gate, &runs, "v");
        async move { cache.get_or_load(&1, load).await }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        sleep(Duration::from_millis(5)).await;
    }
    caller.abort();
    let _ = caller.await;
    drop(cache);
    gate.add_permits(1);
    let other: Cache<u64, String> = Cache::builder("dr")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    common::eventually("the load reached Redis", async || {
        other.get(&1).await.unwrap().is_some()
    })
    .await;
}

/// A clone used on a thread of its own runtime, writing while the original reads: every read is
/// one of the written values, and the final value is seen by both.
#[test]
fn clones_on_two_runtimes_see_each_others_writes() {
    let cache: Cache<u64, String> = Cache::builder("two")
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    let writer = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for i in 0..500 {
                    cache.set(&1, format!("v{i}")).await.unwrap();
                }
            });
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..500 {
            if let Some(v) = cache.get(&1).await.unwrap() {
                assert!(v.starts_with('v'));
            }
        }
    });
    writer.join().unwrap();
    assert_eq!(rt.block_on(cache.get(&1)).unwrap().as_deref(), Some("v499"));
}

// ---------------------------------------------------------------------------------------------
// Loads racing writes in the window the first review did not test
// ---------------------------------------------------------------------------------------------

/// A load that begins while a `write_through` is writing the source (it may read the old row)
/// and ends after the cache update: the update came after the load began, so the load stores
/// nothing and the written value stays.
#[tokio::test(start_paused = true)]
async fn a_load_begun_during_a_write_through_does_not_overwrite_it() {
    for (shape, cache) in memory_shapes(|b| b) {
        let write_gate = Arc::new(Semaphore::new(0));
        let writing = tokio::spawn({
            let (cache, gate) = (cache.clone(), write_gate.clone());
            async move {
                cache
                    .write_through(&1, "new".into(), async move {
                        let _open = gate.acquire().await;
                        Ok::<(), std::io::Error>(())
                    })
                    .await
            }
        });
        sleep(Duration::from_millis(10)).await;
        let load_gate = Arc::new(Semaphore::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn({
            let cache = cache.clone();
            let load = gated(&load_gate, &runs, "old row");
            async move { cache.get_or_load(&1, load).await }
        });
        sleep(Duration::from_millis(10)).await;
        write_gate.add_permits(1);
        writing.await.unwrap().unwrap();
        load_gate.add_permits(1);
        let _ = reader.await.unwrap();
        sleep(Duration::from_millis(10)).await;
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("new"),
            "{shape}"
        );
    }
}

/// `set` while a reload past the soft timeout is in flight and a joiner waits on it: the joiner
/// may get the reload's value, but afterwards the cache holds the set value.
#[tokio::test(start_paused = true)]
async fn a_set_during_a_reload_with_joiners_wins() {
    let capture = Capture::new();
    for (shape, _, cache) in stale_shapes(&capture) {
        cache.get_or_load(&1, ok("old")).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let joiners: Vec<_> = (0..5)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    cache
                        .get_or_load(&1, slow(Duration::from_millis(50), "reloaded"))
                        .await
                })
            })
            .collect();
        sleep(Duration::from_millis(10)).await;
        cache.set(&1, "set".into()).await.unwrap();
        for joiner in joiners {
            let got = joiner.await.unwrap().unwrap();
            assert!(
                matches!(got.as_deref(), Some("old" | "reloaded" | "set")),
                "{shape}: {got:?}"
            );
        }
        sleep(Duration::from_millis(100)).await;
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("set"),
            "{shape}"
        );
    }
}
