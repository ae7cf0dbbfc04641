//! An adversarial review of brisk-cache, written from its documentation only (docs/caching.md,
//! the rustdoc, DESIGN.md §2): each test attacks one promise those make.

mod common;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use brisk_cache::{
    BreakerConfig, BuildError, Cache, CacheKey, Codec, Error, KeyError, LocalTier, MAX_TIMEOUT,
    MAX_TTL, RemoteError,
};
use brisk_core::deadline;
use brisk_metrics::catalog::{
    CACHE_BREAKER_STATE, CACHE_DECODE_FAILURES, CACHE_LOAD_DURATION, CACHE_LOADS,
    CACHE_LOCAL_ENTRIES, CACHE_OVERSIZE, CACHE_REMOTE_DURATION, CACHE_REQUESTS,
};
use brisk_metrics::testing::Capture;
use common::{Source, connect, eventually, raw_get, raw_set, redis};
use tokio::sync::Semaphore;
use tokio::time::{Instant, advance, sleep, timeout};

type R = Result<Option<String>, std::io::Error>;

fn ok(value: &str) -> impl Future<Output = R> + Send + 'static {
    let value = value.to_owned();
    async move { Ok(Some(value)) }
}

async fn fail() -> R {
    Err(std::io::Error::other("db down"))
}

fn slow(after: Duration, value: &str) -> impl Future<Output = R> + Send + 'static {
    let value = value.to_owned();
    async move {
        sleep(after).await;
        Ok(Some(value))
    }
}

/// A loader that waits for `gate` before answering `value`, counting its runs in `runs`.
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

fn memory(name: &str) -> Cache<u64, String> {
    Cache::builder(name).build().unwrap()
}

fn memory_local(name: &str) -> Cache<u64, String> {
    Cache::builder(name)
        .local(LocalTier::entries(100))
        .build()
        .unwrap()
}

fn counter(capture: &Capture, metric: &str, labels: &[(&str, &str)]) -> u64 {
    capture.counter(metric, labels)
}

// ---------------------------------------------------------------------------------------------
// Writes against loads in progress
// ---------------------------------------------------------------------------------------------

/// docs: "`set` and `invalidate` win over a load in progress: it still answers its waiters, but
/// stores nothing." A reader that comes after the `set` must see the set value, not join the
/// older load (read path step 2 comes before the remote tier when there is no local tier).
#[tokio::test(start_paused = true)]
async fn a_read_after_set_sees_the_set_value_not_the_older_load_in_progress() {
    let cache = memory("t");
    let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
    let loading = tokio::spawn({
        let (cache, load) = (cache.clone(), gated(&gate, &runs, "read before the write"));
        async move { cache.get_or_load(&1, load).await }
    });
    sleep(Duration::from_millis(10)).await;
    cache.set(&1, "written".into()).await.unwrap();
    let after = timeout(Duration::from_secs(1), cache.get(&1)).await;
    gate.add_permits(1);
    let _ = loading.await;
    let after = after.expect("a read after a set does not wait for an older load");
    assert_eq!(after.unwrap().as_deref(), Some("written"));
}

/// The same with a loader: a `get_or_load` after `set` is a hit of the set value.
#[tokio::test(start_paused = true)]
async fn a_get_or_load_after_set_is_a_hit_of_the_set_value() {
    let cache = memory("t");
    let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
    let loading = tokio::spawn({
        let (cache, load) = (cache.clone(), gated(&gate, &runs, "read before the write"));
        async move { cache.get_or_load(&1, load).await }
    });
    sleep(Duration::from_millis(10)).await;
    cache.set(&1, "written".into()).await.unwrap();
    let after = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load(&1, ok("loaded after")).await }
    });
    sleep(Duration::from_millis(10)).await;
    gate.add_permits(1);
    assert_eq!(
        loading.await.unwrap().unwrap().as_deref(),
        Some("read before the write")
    );
    assert_eq!(after.await.unwrap().unwrap().as_deref(), Some("written"));
}

/// After `invalidate`, a new reader must not be handed what a load that began before the
/// invalidation read: that load "stores nothing", and its value is for "its waiters" only.
#[tokio::test(start_paused = true)]
async fn a_load_after_invalidate_does_not_get_the_pre_invalidation_value() {
    let cache = memory("t");
    let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
    let loading = tokio::spawn({
        let (cache, load) = (cache.clone(), gated(&gate, &runs, "before"));
        async move { cache.get_or_load(&1, load).await }
    });
    sleep(Duration::from_millis(10)).await;
    cache.invalidate(&1).await.unwrap();
    let after = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load(&1, ok("after")).await }
    });
    sleep(Duration::from_millis(10)).await;
    gate.add_permits(1);
    assert_eq!(loading.await.unwrap().unwrap().as_deref(), Some("before"));
    assert_eq!(after.await.unwrap().unwrap().as_deref(), Some("after"));
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("after"));
}

/// An invalidation during a load: the load stores nothing, on both tiers, without a local tier.
#[tokio::test(start_paused = true)]
async fn an_invalidation_during_a_load_stores_nothing_in_memory() {
    for cache in [memory("t"), memory_local("t")] {
        let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        cache.set(&1, "old".into()).await.unwrap();
        cache.invalidate(&1).await.unwrap();
        let loading = tokio::spawn({
            let (cache, load) = (cache.clone(), gated(&gate, &runs, "before"));
            async move { cache.get_or_load(&1, load).await }
        });
        sleep(Duration::from_millis(10)).await;
        cache.invalidate(&1).await.unwrap();
        gate.add_permits(1);
        assert_eq!(loading.await.unwrap().unwrap().as_deref(), Some("before"));
        sleep(Duration::from_millis(10)).await;
        assert_eq!(cache.get(&1).await.unwrap(), None, "{cache:?}");
    }
}

/// "`write_through` never leaves an old value behind a successful write": a load that began
/// before it (and read the old row) must not overwrite it.
#[tokio::test]
async fn write_through_wins_over_a_load_that_started_before_it() {
    let server = redis();
    let redis = connect(&server).await;
    let caches = [
        memory("t"),
        memory_local("t"),
        Cache::builder("t").redis(redis.clone()).build().unwrap(),
        Cache::builder("t2")
            .redis(redis)
            .local(LocalTier::entries(10))
            .build()
            .unwrap(),
    ];
    for cache in caches {
        let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        let loading = tokio::spawn({
            let (cache, load) = (cache.clone(), gated(&gate, &runs, "old row"));
            async move { cache.get_or_load(&1, load).await }
        });
        sleep(Duration::from_millis(20)).await;
        cache
            .write_through(&1, "new row".into(), async { Ok::<_, std::io::Error>(()) })
            .await
            .unwrap();
        gate.add_permits(1);
        assert_eq!(loading.await.unwrap().unwrap().as_deref(), Some("old row"));
        sleep(Duration::from_millis(100)).await;
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("new row"),
            "{cache:?}"
        );
    }
}

/// docs: a `write_through` dropped midway removes the key from both tiers, "neither the old
/// nor the new value is kept". A load that started before it read the old row; it must not
/// store that old row after the write may have happened.
#[tokio::test(start_paused = true)]
async fn a_dropped_write_through_cuts_off_a_load_in_progress() {
    for cache in [memory("t"), memory_local("t")] {
        let (gate, runs) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        let loading = tokio::spawn({
            let (cache, load) = (cache.clone(), gated(&gate, &runs, "old row"));
            async move { cache.get_or_load(&1, load).await }
        });
        sleep(Duration::from_millis(10)).await;
        let written = Arc::new(AtomicBool::new(false));
        let cut = timeout(
            Duration::from_millis(10),
            cache.write_through(&1, "new row".into(), {
                let written = written.clone();
                async move {
                    written.store(true, Ordering::SeqCst); // the row is written...
                    std::future::pending::<Result<(), std::io::Error>>().await // ...no ack
                }
            }),
        )
        .await;
        assert!(cut.is_err());
        assert!(written.load(Ordering::SeqCst));
        gate.add_permits(1);
        let _ = loading.await.unwrap();
        sleep(Duration::from_millis(10)).await;
        assert_eq!(
            cache.get(&1).await.unwrap(),
            None,
            "{cache:?}: the old row came back after a write that may have happened"
        );
    }
}

/// A `write_through` whose write panics is dropped midway by unwinding: the key is removed.
#[tokio::test(start_paused = true)]
async fn a_write_through_whose_write_panics_removes_the_key() {
    for cache in [memory("t"), memory_local("t")] {
        cache.set(&1, "old".into()).await.unwrap();
        let joined = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .write_through(&1, "new".into(), async {
                        if true {
                            panic!("the database driver broke");
                        }
                        Ok::<_, std::io::Error>(())
                    })
                    .await
            }
        })
        .await;
        assert!(joined.unwrap_err().is_panic());
        sleep(Duration::from_millis(10)).await;
        assert_eq!(cache.get(&1).await.unwrap(), None, "{cache:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cancellation at every await point
// ---------------------------------------------------------------------------------------------

/// A `get_or_load` dropped at any point leaves nothing stuck, and exactly one load happens for
/// the key over both calls (the first's load went on, or never began).
#[tokio::test(start_paused = true)]
async fn get_or_load_dropped_at_every_point_in_memory() {
    for (shape, cache) in [("memory", memory("t")), ("memory+local", memory_local("u"))] {
        for step in 0..30_u64 {
            let source = Source::default();
            let first = {
                let load = source.load("first");
                async move {
                    sleep(Duration::from_millis(10)).await;
                    load.await
                }
            };
            let _ = timeout(
                Duration::from_micros(step * 500),
                cache.get_or_load(&step, first),
            )
            .await;
            let second = timeout(
                Duration::from_secs(11),
                cache.get_or_load(&step, source.load("second")),
            )
            .await
            .expect("not stuck")
            .unwrap();
            assert!(second.is_some(), "{shape} step {step}");
            sleep(Duration::from_millis(20)).await;
            assert_eq!(source.count(), 1, "{shape} step {step}: one load in all");
        }
    }
}

/// The same against a real Redis, where the remote read is a real await point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_dropped_at_every_point_against_redis() {
    let server = redis();
    let redis = connect(&server).await;
    for (shape, cache) in [
        (
            "redis",
            Cache::<u64, String>::builder("t")
                .redis(redis.clone())
                .build()
                .unwrap(),
        ),
        (
            "redis+local",
            Cache::builder("u")
                .redis(redis.clone())
                .local(LocalTier::entries(100))
                .build()
                .unwrap(),
        ),
    ] {
        for step in 0..40_u64 {
            let source = Source::default();
            let first = {
                let load = source.load("first");
                async move {
                    sleep(Duration::from_millis(5)).await;
                    load.await
                }
            };
            let _ = timeout(
                Duration::from_micros(step * 100),
                cache.get_or_load(&step, first),
            )
            .await;
            let second = timeout(
                Duration::from_secs(2),
                cache.get_or_load(&step, source.load("second")),
            )
            .await
            .expect("not stuck")
            .unwrap();
            assert!(second.is_some(), "{shape} step {step}");
            sleep(Duration::from_millis(10)).await;
            assert!(source.count() <= 1, "{shape} step {step}: at most one load");
        }
        // Everything still works.
        cache.set(&1000, "x".into()).await.unwrap();
        assert_eq!(cache.get(&1000).await.unwrap().as_deref(), Some("x"));
    }
}

/// A caller dropped while its remote read waits on a paused Redis must not leave a flight that
/// blocks later callers of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropped_during_a_slow_remote_read_blocks_no_one() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .remote_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    server.pause().unwrap();
    let _ = timeout(
        Duration::from_millis(30),
        cache.get_or_load(&1, ok("first")),
    )
    .await;
    server.resume().unwrap();
    let started = Instant::now();
    let second = timeout(Duration::from_secs(3), cache.get_or_load(&1, ok("second")))
        .await
        .expect("not stuck")
        .unwrap();
    assert!(second.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// `set` and `invalidate` dropped at every point: afterwards the cache works and answers one of
/// the values it was given, never a value it was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_invalidate_dropped_at_every_point_against_redis() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .build()
        .unwrap();
    for step in 0..30_u64 {
        cache.set(&step, "old".into()).await.unwrap();
        let _ = timeout(
            Duration::from_micros(step * 100),
            cache.set(&step, "new".into()),
        )
        .await;
        let got = cache.get(&step).await.unwrap();
        assert!(
            matches!(got.as_deref(), Some("old" | "new")),
            "step {step}: {got:?}"
        );
        let _ = timeout(Duration::from_micros(step * 100), cache.invalidate(&step)).await;
        let got = cache.get(&step).await.unwrap();
        assert!(
            matches!(got.as_deref(), None | Some("old" | "new")),
            "step {step}: {got:?}"
        );
        cache.invalidate(&step).await.unwrap();
        assert_eq!(cache.get(&step).await.unwrap(), None, "step {step}");
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_deadline_error_says_the_deadline_fired_and_after_how_long() {
    let cache = memory("t");
    let started = Instant::now();
    let outcome = deadline::scope(
        Instant::now() + Duration::from_millis(50),
        cache.get_or_load(&1, slow(Duration::from_secs(1), "v")),
    )
    .await;
    match outcome {
        Err(Error::Deadline(e)) => {
            assert!(e.is_deadline());
            assert_eq!(e.after(), Duration::from_millis(50));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn an_outer_shorter_deadline_bounds_an_inner_longer_scope() {
    let cache = memory("t");
    let started = Instant::now();
    let outcome = deadline::scope(
        Instant::now() + Duration::from_millis(50),
        deadline::scope(
            Instant::now() + Duration::from_secs(5),
            cache.get_or_load(&1, slow(Duration::from_secs(1), "v")),
        ),
    )
    .await;
    assert!(matches!(outcome, Err(Error::Deadline(_))), "{outcome:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(50));
}

/// "a caller ... whose deadline passes does not stop it for the others": the load runs on its
/// own task, so the first caller's deadline must not bound the waits inside the loader.
#[tokio::test(start_paused = true)]
async fn the_load_does_not_inherit_the_first_callers_deadline() {
    let cache = memory("t");
    let load = async {
        // A brisk wait inside the loader (a pool checkout, say): bounded by any deadline in scope.
        deadline::bounded(Duration::from_secs(5), sleep(Duration::from_millis(200)))
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(Some("v".to_owned()))
    };
    let first = tokio::spawn({
        let cache = cache.clone();
        deadline::scope(Instant::now() + Duration::from_millis(50), async move {
            cache.get_or_load(&1, load).await
        })
    });
    sleep(Duration::from_millis(10)).await;
    let second = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load(&1, ok("second")).await }
    });
    assert!(matches!(first.await.unwrap(), Err(Error::Deadline(_))));
    let second = second.await.unwrap();
    assert_eq!(
        second.unwrap().as_deref(),
        Some("v"),
        "the load went on for the others"
    );
}

/// A loader sees no caller's deadline at all: `deadline::remaining()` inside it is `None`.
#[tokio::test(start_paused = true)]
async fn the_loader_runs_under_no_callers_deadline() {
    let cache = memory("t");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let load = {
        let seen = seen.clone();
        async move {
            *seen.lock().unwrap() = Some(deadline::remaining());
            Ok::<_, std::io::Error>(Some("v".to_owned()))
        }
    };
    let got = deadline::scope(
        Instant::now() + Duration::from_secs(1),
        cache.get_or_load(&1, load),
    )
    .await;
    assert_eq!(got.unwrap().as_deref(), Some("v"));
    assert_eq!(*seen.lock().unwrap(), Some(None));
}

/// docs: `get` without a loader fails only with `Error::Key`: an expired budget is no error.
#[tokio::test(start_paused = true)]
async fn get_without_a_loader_never_fails_with_deadline_in_memory() {
    for cache in [memory("t"), memory_local("t")] {
        cache.set(&1, "v".into()).await.unwrap();
        for key in [1, 2] {
            let got = deadline::scope(Instant::now(), cache.get(&key)).await;
            assert!(got.is_ok(), "{cache:?} key {key}: {got:?}");
        }
    }
}

#[tokio::test]
async fn get_without_a_loader_never_fails_with_deadline_against_redis() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    for key in [1, 2] {
        let got = deadline::scope(Instant::now(), cache.get(&key)).await;
        assert!(got.is_ok(), "key {key}: {got:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_local_hit_is_served_under_an_expired_deadline() {
    let cache = memory_local("t");
    cache.set(&1, "v".into()).await.unwrap();
    let got = deadline::scope(Instant::now(), cache.get_or_load(&1, fail())).await;
    assert_eq!(got.unwrap().as_deref(), Some("v"));
}

/// A caller's spent budget says nothing about Redis: it must not count as a Redis failure and
/// open the breaker for every other request.
#[tokio::test]
async fn expired_deadlines_do_not_open_the_breaker() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    cache.set(&1, "v".into()).await.unwrap();
    for key in 2..30 {
        let _ = deadline::scope(Instant::now(), cache.get_or_load(&key, ok("x"))).await;
    }
    assert_ne!(
        capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "t")]),
        Some(2.0),
        "the breaker opened though Redis never failed"
    );
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("v"),
        "Redis is used"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deadline_beyond_the_hard_timeout_gets_load_timeout_at_the_hard_timeout() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .hard_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let outcome = deadline::scope(
        Instant::now() + Duration::from_secs(20),
        cache.get_or_load(&1, slow(Duration::from_secs(3600), "v")),
    )
    .await;
    assert!(
        matches!(outcome, Err(Error::LoadTimeout { after }) if after == Duration::from_secs(5)),
        "{outcome:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_before_the_soft_timeout_serves_the_stale_value_at_the_deadline() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .ttl(Duration::from_secs(1))
        .stale_for(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let started = Instant::now();
    let got = deadline::scope(
        Instant::now() + Duration::from_millis(30),
        cache.get_or_load(&1, slow(Duration::from_secs(1), "new")),
    )
    .await;
    assert_eq!(got.unwrap().as_deref(), Some("old"));
    assert_eq!(started.elapsed(), Duration::from_millis(30));
}

/// "The most a load may take": a joiner that came later gets the timeout when the load's hard
/// timeout passes, not a hard timeout of its own.
#[tokio::test(start_paused = true)]
async fn the_hard_timeout_counts_from_the_start_of_the_load_for_joiners() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .hard_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let first = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(&1, slow(Duration::from_secs(3600), "v"))
                .await
        }
    });
    sleep(Duration::from_secs(3)).await;
    let joiner = cache.get_or_load(&1, ok("joiner")).await;
    assert!(
        matches!(joiner, Err(Error::LoadTimeout { .. })),
        "{joiner:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert!(matches!(
        first.await.unwrap(),
        Err(Error::LoadTimeout { .. })
    ));
    // The key is free again.
    assert_eq!(
        cache.get_or_load(&1, ok("again")).await.unwrap().as_deref(),
        Some("again")
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_stale_value_the_soft_timeout_does_not_cut_the_wait() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .stale_for(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let started = Instant::now();
    let got = cache
        .get_or_load(&1, slow(Duration::from_secs(1), "v"))
        .await;
    assert_eq!(got.unwrap().as_deref(), Some("v"));
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------------
// Fail-safe
// ---------------------------------------------------------------------------------------------

fn stale_cache(capture: &Capture, local: bool) -> Cache<u64, String> {
    capture.run(|| {
        let builder = Cache::builder("t")
            .ttl(Duration::from_secs(1))
            .stale_for(Duration::from_secs(10))
            .soft_timeout(Duration::from_millis(100))
            .hard_timeout(Duration::from_secs(5));
        if local {
            builder.local(LocalTier::entries(100)).build().unwrap()
        } else {
            builder.build().unwrap()
        }
    })
}

fn stale_served(capture: &Capture) -> u64 {
    ["local", "remote"]
        .iter()
        .map(|tier| {
            capture.counter(
                CACHE_REQUESTS.name,
                &[("cache", "t"), ("tier", tier), ("outcome", "stale")],
            )
        })
        .sum()
}

#[tokio::test(start_paused = true)]
async fn with_stale_for_zero_no_stale_value_is_ever_served() {
    for local in [false, true] {
        let cache: Cache<u64, String> = {
            let b = Cache::builder("t").ttl(Duration::from_secs(1));
            if local {
                b.local(LocalTier::entries(10))
            } else {
                b
            }
            .build()
            .unwrap()
        };
        cache.set(&1, "old".into()).await.unwrap();
        advance(Duration::from_millis(1_001)).await;
        let got = cache.get_or_load(&1, fail()).await;
        assert!(matches!(got, Err(Error::Load(_))), "local {local}: {got:?}");
        let got = cache
            .get_or_load(&1, slow(Duration::from_secs(60), "never"))
            .await;
        assert!(
            matches!(got, Err(Error::LoadTimeout { .. })),
            "local {local}: {got:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_stale_window_ends_at_ttl_plus_stale_for() {
    for local in [false, true] {
        let capture = Capture::new();
        let cache = stale_cache(&capture, local);
        cache.set(&1, "old".into()).await.unwrap();
        cache.set(&2, "old".into()).await.unwrap();
        advance(Duration::from_millis(10_900)).await;
        assert_eq!(
            cache.get_or_load(&1, fail()).await.unwrap().as_deref(),
            Some("old")
        );
        advance(Duration::from_millis(200)).await; // 11.1 s: past 1 s + 10 s
        let got = cache.get_or_load(&2, fail()).await;
        assert!(matches!(got, Err(Error::Load(_))), "local {local}: {got:?}");
        assert_eq!(stale_served(&capture), 1, "local {local}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reload_serves_the_stale_value() {
    for local in [false, true] {
        let capture = Capture::new();
        let cache = stale_cache(&capture, local);
        cache.set(&1, "old".into()).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, async {
                sleep(Duration::from_millis(10)).await;
                if true {
                    panic!("boom");
                }
                Ok::<_, std::io::Error>(None)
            })
            .await;
        assert_eq!(got.unwrap().as_deref(), Some("old"), "local {local}");
        assert_eq!(stale_served(&capture), 1);
        assert_eq!(
            counter(
                &capture,
                CACHE_LOADS.name,
                &[("cache", "t"), ("outcome", "panic")]
            ),
            1
        );
    }
}

/// `Ok(None)` is an answer ("there is none"), not a failure: the stale value must not stand in.
#[tokio::test(start_paused = true)]
async fn a_reload_answering_none_is_not_replaced_by_the_stale_value() {
    for local in [false, true] {
        let cache = stale_cache(&Capture::new(), local);
        cache.set(&1, "old".into()).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, async { Ok::<_, std::io::Error>(None) })
            .await;
        assert_eq!(got.unwrap(), None, "local {local}");
        assert_eq!(cache.get(&1).await.unwrap(), None, "local {local}");
    }
}

/// `get` without a loader: "fresh values only", also from the local tier.
#[tokio::test(start_paused = true)]
async fn a_stale_local_entry_is_not_served_by_get() {
    let cache = stale_cache(&Capture::new(), true);
    cache.set(&1, "old".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("old"));
    advance(Duration::from_secs(2)).await;
    assert_eq!(cache.get(&1).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn the_soft_timeout_with_a_local_stale_value_is_exact_and_the_refresh_lands() {
    let capture = Capture::new();
    let cache = stale_cache(&capture, true);
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let started = Instant::now();
    let got = cache
        .get_or_load(&1, slow(Duration::from_secs(1), "new"))
        .await;
    assert_eq!(got.unwrap().as_deref(), Some("old"));
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    sleep(Duration::from_secs(1)).await;
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("new"));
}

// ---------------------------------------------------------------------------------------------
// TTLs
// ---------------------------------------------------------------------------------------------

/// docs: `negative_ttl` defaults to "the TTL, at most 30 s".
#[tokio::test(start_paused = true)]
async fn the_negative_ttl_defaults_to_the_ttl_at_most_thirty_seconds() {
    for (ttl, negative) in [(60, 30), (10, 10)] {
        let cache: Cache<u64, String> = Cache::builder("t")
            .ttl(Duration::from_secs(ttl))
            .build()
            .unwrap();
        let source = Source::default();
        assert_eq!(
            cache
                .get_or_load(&1, async { Ok::<_, std::io::Error>(None) })
                .await
                .unwrap(),
            None
        );
        advance(Duration::from_secs(negative) - Duration::from_millis(100)).await;
        assert_eq!(
            cache.get_or_load(&1, source.load("x")).await.unwrap(),
            None,
            "ttl {ttl}"
        );
        advance(Duration::from_millis(200)).await;
        assert_eq!(
            cache
                .get_or_load(&1, source.load("x"))
                .await
                .unwrap()
                .as_deref(),
            Some("x")
        );
        assert_eq!(source.count(), 1, "ttl {ttl}");
    }
}

/// docs: "a missing row costs one query rather than one per request".
#[tokio::test(start_paused = true)]
async fn a_missing_row_costs_one_query_for_many_requests() {
    for cache in [memory("t"), memory_local("t")] {
        let runs = Arc::new(AtomicUsize::new(0));
        let none = || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_millis(5)).await;
                Ok::<Option<String>, std::io::Error>(None)
            }
        };
        let calls: Vec<_> = (0..50).map(|_| cache.get_or_load(&7, none())).collect();
        for got in futures_util::future::join_all(calls).await {
            assert_eq!(got.unwrap(), None);
        }
        for _ in 0..50 {
            assert_eq!(cache.get_or_load(&7, none()).await.unwrap(), None);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{cache:?}");
    }
}

/// `ttl_jitter(0.5)` of 10 s: every entry lives between 5 and 10 s, and not all the same.
#[tokio::test(start_paused = true)]
async fn jitter_spreads_expiry_within_the_fraction() {
    for local in [false, true] {
        let cache: Cache<u64, String> = {
            let b = Cache::builder("t")
                .ttl(Duration::from_secs(10))
                .ttl_jitter(0.5);
            if local {
                b.local(LocalTier::entries(1_000))
            } else {
                b
            }
            .build()
            .unwrap()
        };
        for key in 0..200 {
            cache.set(&key, "v".into()).await.unwrap();
        }
        let alive = async || {
            let mut n = 0;
            for key in 0..200 {
                n += usize::from(cache.get(&key).await.unwrap().is_some());
            }
            n
        };
        advance(Duration::from_millis(4_990)).await;
        assert_eq!(
            alive().await,
            200,
            "local {local}: none before half the TTL"
        );
        advance(Duration::from_millis(2_510)).await; // 7.5 s
        let mid = alive().await;
        assert!(
            mid > 0 && mid < 200,
            "local {local}: spread, {mid} of 200 alive at 7.5 s"
        );
        advance(Duration::from_millis(2_510)).await; // 10.01 s
        assert_eq!(alive().await, 0, "local {local}: none past the TTL");
    }
}

/// With `stale_for`, "Redis keeps each value that much longer than its TTL".
#[tokio::test]
async fn redis_keeps_a_value_for_its_ttl_plus_the_stale_window() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .ttl(Duration::from_secs(10))
        .stale_for(Duration::from_secs(20))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    let pttl: i64 = server
        .command(&["PTTL", "{brisk:t:1:i:1}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pttl > 29_000 && pttl <= 30_000, "PTTL {pttl}");
}

/// "Redis TTLs are milliseconds": a TTL under a millisecond is not refused by `build()`, so it
/// must work — `set` on a healthy Redis is no error.
#[tokio::test]
async fn a_sub_millisecond_ttl_is_refused_or_works_with_redis() {
    let server = redis();
    let redis = connect(&server).await;
    let built = Cache::<u64, String>::builder("t")
        .redis(redis.clone())
        .ttl(Duration::from_micros(500))
        .build();
    if let Ok(cache) = built {
        let set = cache.set(&1, "v".into()).await;
        assert!(set.is_ok(), "set on a healthy Redis: {set:?}");
    }
    // A 2 ms TTL with a jitter of 0.9 (both accepted) makes entries of 0.2 to 2 ms.
    let cache: Cache<u64, String> = Cache::builder("u")
        .redis(redis)
        .ttl(Duration::from_millis(2))
        .ttl_jitter(0.9)
        .build()
        .unwrap();
    for key in 0..50 {
        let set = cache.set(&key, "v".into()).await;
        assert!(set.is_ok(), "key {key}: set on a healthy Redis: {set:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Build errors
// ---------------------------------------------------------------------------------------------

fn builder() -> brisk_cache::CacheBuilder<u64, String> {
    Cache::builder("t")
}

#[test]
fn durations_above_the_maximum_are_refused_naming_the_setting() {
    let over = MAX_TIMEOUT + Duration::from_secs(1);
    let err = builder()
        .hard_timeout(MAX_TIMEOUT)
        .soft_timeout(over)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("soft"), "{err}");
    let err = builder().remote_timeout(over).build().unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::TooLong {
                setting: "remote_timeout",
                ..
            }
        ),
        "{err}"
    );
    let err = builder()
        .stale_for(MAX_TTL + Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::TooLong {
                setting: "stale_for",
                ..
            }
        ),
        "{err}"
    );
    let err = builder()
        .ttl(MAX_TTL + Duration::from_millis(1))
        .build()
        .unwrap_err();
    assert!(
        matches!(err, BuildError::TooLong { setting: "ttl", .. }),
        "{err}"
    );
    let err = builder().negative_ttl(Duration::MAX).build().unwrap_err();
    assert!(err.to_string().contains("negative_ttl"), "{err}");
    let err = builder()
        .local(LocalTier::entries(1).ttl(Duration::MAX))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("local tier ttl"), "{err}");
}

/// `open_for` is a duration like the others: refused above the maximum, or honoured without
/// overflow when the breaker opens.
#[tokio::test]
async fn a_huge_breaker_open_for_is_refused_or_harmless() {
    let mut server = redis();
    let redis = connect(&server).await;
    let built = Cache::<u64, String>::builder("t")
        .redis(redis)
        .breaker(BreakerConfig {
            failures: 1,
            open_for: Duration::MAX,
        })
        .build();
    match built {
        Err(err) => assert!(err.to_string().contains("open_for"), "{err}"),
        Ok(cache) => {
            server.kill().unwrap();
            for key in 0..10 {
                let got = timeout(Duration::from_secs(2), cache.get_or_load(&key, ok("v"))).await;
                assert_eq!(got.unwrap().unwrap().as_deref(), Some("v"));
            }
        }
    }
}

#[test]
fn a_breaker_open_for_above_max_timeout_is_refused() {
    let err = builder()
        .breaker(BreakerConfig {
            failures: 5,
            open_for: MAX_TTL + Duration::from_secs(1),
        })
        .build();
    assert!(
        matches!(&err, Err(BuildError::TooLong { .. })),
        "a breaker open for over a year was accepted: {err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_largest_accepted_settings_work() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .ttl(MAX_TTL)
        .stale_for(MAX_TTL)
        .negative_ttl(MAX_TTL)
        .hard_timeout(MAX_TIMEOUT)
        .soft_timeout(MAX_TIMEOUT - Duration::from_millis(1))
        .remote_timeout(MAX_TIMEOUT)
        .local(LocalTier::entries(u64::MAX).ttl(MAX_TTL))
        .max_key_len(usize::MAX)
        .max_value_size(usize::MAX)
        .in_memory(u64::MAX)
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    let started = Instant::now();
    let got = cache
        .get_or_load(&2, slow(Duration::from_secs(7_200), "never"))
        .await;
    assert!(
        matches!(got, Err(Error::LoadTimeout { after }) if after == MAX_TIMEOUT),
        "{got:?}"
    );
    assert_eq!(started.elapsed(), MAX_TIMEOUT);
}

#[tokio::test]
async fn the_largest_ttl_works_with_redis() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .ttl(MAX_TTL)
        .stale_for(MAX_TTL)
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Nothing;

impl CacheKey for Nothing {
    fn encode(&self, _out: &mut Vec<u8>) {}
}

#[tokio::test]
async fn a_key_that_encodes_nothing_is_refused_by_every_operation() {
    let cache: Cache<Nothing, String> = Cache::builder("t")
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    let empty = |r: Result<_, Error>| matches!(r, Err(Error::Key(KeyError::Empty)));
    assert!(empty(cache.set(&Nothing, "v".into()).await));
    assert!(empty(cache.get(&Nothing).await.map(drop)));
    assert!(empty(cache.get_or_load(&Nothing, ok("v")).await.map(drop)));
    assert!(empty(cache.invalidate(&Nothing).await));
    let ran = AtomicBool::new(false);
    let r = cache
        .write_through(&Nothing, "v".into(), async {
            ran.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await;
    assert!(empty(r));
    assert!(!ran.load(Ordering::SeqCst));
}

/// A key type whose `encode`, `hash` or `eq` may panic (user code that misbehaves).
#[derive(Clone, Debug)]
struct Touchy {
    id: u64,
    panic_in: &'static str,
}

impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        assert!(
            self.panic_in != "eq" && other.panic_in != "eq",
            "eq panicked"
        );
        self.id == other.id
    }
}
impl Eq for Touchy {}

impl Hash for Touchy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        assert!(self.panic_in != "hash", "hash panicked");
        self.id.hash(state);
    }
}

impl CacheKey for Touchy {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.panic_in != "encode", "encode panicked");
        self.id.encode(out);
    }
}

/// A panicking key impl is the caller's bug; it may fail that caller, but it must not poison
/// the cache for every other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_impls_panic_does_not_break_the_cache_for_other_keys() {
    for panic_in in ["encode", "hash"] {
        for local in [false, true] {
            let cache: Cache<Touchy, String> = {
                let b = Cache::builder("t");
                if local {
                    b.local(LocalTier::entries(10))
                } else {
                    b
                }
                .build()
                .unwrap()
            };
            let bad = Touchy { id: 1, panic_in };
            for op in 0..3 {
                let (cache, bad) = (cache.clone(), bad.clone());
                let _ = tokio::spawn(async move {
                    match op {
                        0 => cache.get_or_load(&bad, ok("v")).await.map(drop),
                        1 => cache.set(&bad, "v".into()).await,
                        _ => cache.invalidate(&bad).await,
                    }
                })
                .await;
            }
            let good = Touchy {
                id: 2,
                panic_in: "",
            };
            let got = timeout(Duration::from_secs(2), cache.get_or_load(&good, ok("fine"))).await;
            assert_eq!(
                got.expect("not stuck").unwrap().as_deref(),
                Some("fine"),
                "{panic_in} local {local}"
            );
            cache.set(&good, "set".into()).await.unwrap();
            assert_eq!(cache.get(&good).await.unwrap().as_deref(), Some("set"));
        }
    }
}

#[tokio::test]
async fn keys_are_stored_under_the_documented_redis_keys_and_never_share_an_entry() {
    let server = redis();
    let redis = connect(&server).await;
    let ints: Cache<u64, String> = Cache::builder("users")
        .redis(redis.clone())
        .build()
        .unwrap();
    let strings: Cache<String, String> = Cache::builder("names")
        .redis(redis.clone())
        .build()
        .unwrap();
    let tuples: Cache<(String, String), String> =
        Cache::builder("pairs").redis(redis).build().unwrap();
    ints.set(&42, "int".into()).await.unwrap();
    strings.set(&"ada".to_owned(), "str".into()).await.unwrap();
    assert!(raw_get(&server, "{brisk:users:1:i:42}").await.is_some());
    assert!(raw_get(&server, "{brisk:names:1:s:ada}").await.is_some());
    tuples
        .set(&("a:b".into(), "c".into()), "first".into())
        .await
        .unwrap();
    tuples
        .set(&("a".into(), "b:c".into()), "second".into())
        .await
        .unwrap();
    assert_eq!(
        tuples
            .get(&("a:b".into(), "c".into()))
            .await
            .unwrap()
            .as_deref(),
        Some("first")
    );
    assert_eq!(
        tuples
            .get(&("a".into(), "b:c".into()))
            .await
            .unwrap()
            .as_deref(),
        Some("second")
    );
}

/// docs: "Each value travels in a 37-byte envelope".
#[tokio::test]
async fn the_envelope_is_thirty_seven_bytes() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .codec(Codec::Json)
        .build()
        .unwrap();
    cache.set(&1, "abc".into()).await.unwrap();
    let raw = raw_get(&server, "{brisk:t:1:i:1}").await.unwrap();
    assert_eq!(raw.len(), 37 + br#""abc""#.len(), "{raw:?}");
    assert!(raw.ends_with(br#""abc""#));
}

// ---------------------------------------------------------------------------------------------
// Values whose serde impls misbehave
// ---------------------------------------------------------------------------------------------

/// Serializes as a bool when `ok`; fails (or panics) to serialize otherwise.
#[derive(Clone, Debug, PartialEq)]
struct Picky {
    ok: bool,
    panics: bool,
}

const GOOD: Picky = Picky {
    ok: true,
    panics: false,
};
const BAD: Picky = Picky {
    ok: false,
    panics: false,
};
const PANICKY: Picky = Picky {
    ok: false,
    panics: true,
};

impl serde::Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        assert!(!self.panics, "Serialize panicked");
        if self.ok {
            s.serialize_bool(true)
        } else {
            Err(serde::ser::Error::custom("this value refuses to serialize"))
        }
    }
}

impl<'de> serde::Deserialize<'de> for Picky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ok = bool::deserialize(d)?;
        Ok(Self { ok, panics: false })
    }
}

fn picky_caches(
    server: &brisk_testkit::RedisServer,
    redis: brisk_pool::redis_source::Multiplexed,
) -> Vec<Cache<u64, Picky>> {
    let _ = server;
    vec![
        Cache::builder("p").build().unwrap(),
        Cache::builder("p")
            .local(LocalTier::entries(10))
            .build()
            .unwrap(),
        Cache::builder("p1").redis(redis.clone()).build().unwrap(),
        Cache::builder("p2")
            .redis(redis)
            .local(LocalTier::entries(10))
            .build()
            .unwrap(),
    ]
}

/// docs: `Error::Encode`: "The value could not be serialized; nothing was stored."
#[tokio::test]
async fn set_of_an_unserializable_value_is_encode_and_stores_nothing() {
    let server = redis();
    for cache in picky_caches(&server, connect(&server).await) {
        cache.set(&1, GOOD).await.unwrap();
        let err = cache.set(&1, BAD).await.unwrap_err();
        assert!(matches!(err, Error::Encode(_)), "{err}");
        assert!(err.to_string().contains("refuses to serialize"), "{err}");
        assert_ne!(
            cache.get(&1).await.unwrap(),
            Some(BAD),
            "{cache:?}: it was stored"
        );
    }
}

/// docs: `write_through`'s `Error::Encode` is "source written, key removed".
#[tokio::test]
async fn write_through_of_an_unserializable_value_removes_the_old_one() {
    let server = redis();
    for cache in picky_caches(&server, connect(&server).await) {
        cache.set(&1, GOOD).await.unwrap();
        let ran = AtomicBool::new(false);
        let err = cache
            .write_through(&1, BAD, async {
                ran.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Encode(_)), "{err}");
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(
            cache.get(&1).await.unwrap(),
            None,
            "{cache:?}: the old value survived"
        );
    }
}

/// codec docs: a load's value that does not serialize "is served but not stored remotely".
#[tokio::test]
async fn a_loaded_value_that_cannot_be_serialized_is_still_served() {
    let server = redis();
    for cache in picky_caches(&server, connect(&server).await) {
        let got = cache
            .get_or_load(&1, async { Ok::<_, std::io::Error>(Some(BAD)) })
            .await;
        assert_eq!(got.unwrap(), Some(BAD), "{cache:?}");
        // And the key can be loaded again, nothing stuck.
        let got = timeout(
            Duration::from_secs(2),
            cache.get_or_load(&2, async { Ok::<_, std::io::Error>(Some(GOOD)) }),
        )
        .await;
        assert_eq!(got.unwrap().unwrap(), Some(GOOD));
    }
}

/// A `Serialize` that panics on the load's task: waiters get an answer (the value or
/// `Panicked`), never a hang, and the key can be loaded again.
#[tokio::test]
async fn a_loaded_value_whose_serialize_panics_hangs_no_one() {
    let server = redis();
    for cache in picky_caches(&server, connect(&server).await) {
        let got = timeout(
            Duration::from_secs(2),
            cache.get_or_load(&1, async { Ok::<_, std::io::Error>(Some(PANICKY)) }),
        )
        .await
        .expect("answered");
        assert!(
            matches!(got, Ok(Some(_)) | Err(Error::Panicked { .. })),
            "{got:?}"
        );
        let again = timeout(
            Duration::from_secs(2),
            cache.get_or_load(&1, async { Ok::<_, std::io::Error>(Some(GOOD)) }),
        )
        .await
        .expect("answered");
        assert!(again.unwrap().is_some(), "{cache:?}");
    }
}

/// Never deserializes (a type whose serde impls disagree).
#[derive(Clone, Debug, PartialEq)]
struct WriteOnly(u32);

impl serde::Serialize for WriteOnly {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for WriteOnly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _ = u32::deserialize(d)?;
        Err(serde::de::Error::custom("never"))
    }
}

#[tokio::test]
async fn a_value_that_does_not_deserialize_is_a_counted_miss_and_reloads() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, WriteOnly> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    cache.set(&1, WriteOnly(7)).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(
        capture.counter(
            CACHE_DECODE_FAILURES.name,
            &[("cache", "t"), ("reason", "payload")]
        ),
        1
    );
    let got = cache
        .get_or_load(&1, async { Ok::<_, std::io::Error>(Some(WriteOnly(8))) })
        .await;
    assert_eq!(got.unwrap(), Some(WriteOnly(8)));
}

// ---------------------------------------------------------------------------------------------
// The local tier
// ---------------------------------------------------------------------------------------------

fn local_hits(capture: &Capture) -> u64 {
    capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", "t"), ("tier", "local"), ("outcome", "hit")],
    )
}

/// docs: "a weigher that panics weighs the value as 1".
#[tokio::test]
async fn a_panicking_weigher_weighs_one_and_the_value_is_kept() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::weighted(10, |_k: &u64, _v: &String| -> u64 {
                panic!("weigher broke")
            }))
            .build()
            .unwrap()
    });
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    assert_eq!(local_hits(&capture), 1, "kept locally");
    let got = cache.get_or_load(&2, ok("loaded")).await;
    assert_eq!(got.unwrap().as_deref(), Some("loaded"));
}

/// docs: weights above `u32::MAX` count as `u32::MAX`; a value too heavy for a shard is not kept
/// locally — and still served from the remote tier.
#[tokio::test]
async fn a_huge_weight_is_not_kept_locally_but_is_served() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::weighted(1_000, |_k: &u64, _v: &String| u64::MAX))
            .build()
            .unwrap()
    });
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    assert_eq!(
        cache.get_or_load(&2, ok("w")).await.unwrap().as_deref(),
        Some("w")
    );
    assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("w"));
    assert_eq!(local_hits(&capture), 0);
}

#[tokio::test]
async fn the_local_entries_gauge_follows_the_local_tier() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    });
    for key in 0..3 {
        cache.set(&key, "v".into()).await.unwrap();
    }
    let _ = cache.get_or_load(&3, ok("w")).await.unwrap();
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "t")]),
        Some(4.0)
    );
    cache.invalidate(&0).await.unwrap();
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "t")]),
        Some(3.0)
    );
}

/// docs: the local TTL is "how long a process serves a value without asking Redis"; past it the
/// other process's new value is seen.
#[tokio::test]
async fn another_processes_write_is_seen_after_the_local_ttl() {
    let server = redis();
    let redis = connect(&server).await;
    let make = || {
        Cache::<u64, String>::builder("t")
            .redis(redis.clone())
            .local(LocalTier::entries(10).ttl(Duration::from_millis(200)))
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    a.set(&1, "v1".into()).await.unwrap();
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("v1"));
    a.set(&1, "v2".into()).await.unwrap();
    sleep(Duration::from_millis(250)).await;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("v2"));
}

// ---------------------------------------------------------------------------------------------
// Oversize values
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_tiny_max_value_size_keeps_everything_out_of_redis_and_calls_succeed() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .max_value_size(1)
            .local(LocalTier::entries(10))
            .build()
            .unwrap()
    });
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("v"),
        "the local tier keeps it"
    );
    assert_eq!(
        cache.get_or_load(&2, ok("w")).await.unwrap().as_deref(),
        Some("w")
    );
    sleep(Duration::from_millis(100)).await;
    assert_eq!(raw_get(&server, "{brisk:t:1:i:1}").await, None);
    assert_eq!(raw_get(&server, "{brisk:t:1:i:2}").await, None);
    assert_eq!(capture.counter(CACHE_OVERSIZE.name, &[("cache", "t")]), 2);
}

/// docs: an oversize value is kept out of Redis "and what Redis held for the key removed".
#[tokio::test]
async fn an_oversize_value_removes_what_redis_held_for_the_key() {
    let server = redis();
    let redis = connect(&server).await;
    let roomy: Cache<u64, String> = Cache::builder("t").redis(redis.clone()).build().unwrap();
    let tight: Cache<u64, String> = Cache::builder("t")
        .redis(redis)
        .max_value_size(64)
        .build()
        .unwrap();
    roomy.set(&1, "old".into()).await.unwrap();
    tight.set(&1, "x".repeat(200)).await.unwrap();
    assert_eq!(raw_get(&server, "{brisk:t:1:i:1}").await, None);
    assert_eq!(roomy.get(&1).await.unwrap(), None, "the old value is gone");
    // The load path too: an oversize loaded value still answers.
    let got = tight.get_or_load(&3, ok(&"y".repeat(200))).await.unwrap();
    assert_eq!(got.map(|v| v.len()), Some(200));
}

#[tokio::test]
async fn a_tiny_in_memory_tier_still_answers() {
    let cache: Cache<u64, String> = Cache::builder("t").in_memory(64).build().unwrap();
    cache.set(&1, "x".repeat(1_000)).await.unwrap();
    let got = cache.get_or_load(&2, ok(&"y".repeat(1_000))).await.unwrap();
    assert_eq!(got.map(|v| v.len()), Some(1_000));
}

// ---------------------------------------------------------------------------------------------
// Redis faults
// ---------------------------------------------------------------------------------------------

const RT: Duration = Duration::from_millis(400);
const SLACK: Duration = Duration::from_millis(250);

/// docs table: paused Redis — `set`/`invalidate` give "`Error::Remote` after at most
/// `remote_timeout`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_invalidate_on_a_paused_redis_fail_within_the_remote_timeout() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .remote_timeout(RT)
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let err = cache.set(&1, "new".into()).await.unwrap_err();
    let set_took = started.elapsed();
    let started = Instant::now();
    let err2 = cache.invalidate(&1).await.unwrap_err();
    let invalidate_took = started.elapsed();
    server.resume().unwrap();
    assert!(
        matches!(err, Error::Remote(RemoteError::Timeout(_))),
        "{err}"
    );
    assert!(
        matches!(err2, Error::Remote(RemoteError::Timeout(_))),
        "{err2}"
    );
    assert!(
        set_took < RT + SLACK,
        "set took {set_took:?}, remote_timeout {RT:?}"
    );
    assert!(
        invalidate_took < RT + SLACK,
        "invalidate took {invalidate_took:?}"
    );
}

/// A deadline shorter than the remote timeout bounds `set`, and the error says the deadline
/// fired; a longer one leaves the remote timeout to fire, and the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_on_a_paused_redis_says_which_bound_fired() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .remote_timeout(RT)
        .breaker(BreakerConfig {
            failures: 100,
            open_for: Duration::from_millis(500),
        })
        .build()
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let short = deadline::scope(
        Instant::now() + Duration::from_millis(50),
        cache.set(&1, "v".into()),
    )
    .await;
    let short_took = started.elapsed();
    let long = deadline::scope(
        Instant::now() + Duration::from_secs(30),
        cache.set(&1, "v".into()),
    )
    .await;
    server.resume().unwrap();
    match short {
        Err(Error::Remote(RemoteError::Timeout(e))) => assert!(e.is_deadline(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(
        short_took < Duration::from_millis(50) + SLACK,
        "{short_took:?}"
    );
    match long {
        Err(Error::Remote(RemoteError::Timeout(e))) => {
            assert!(!e.is_deadline(), "{e}");
            assert_eq!(e.after(), RT);
        }
        other => panic!("{other:?}"),
    }
}

/// docs: a read on a paused Redis "waits at most `remote_timeout` — or the deadline — then goes
/// on as a miss".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_paused_redis_is_bounded_by_the_deadline() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .remote_timeout(RT)
        .build()
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let got = deadline::scope(Instant::now() + Duration::from_millis(50), cache.get(&1)).await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert!(took < Duration::from_millis(50) + SLACK, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_breaker_is_open_set_fails_at_once_with_breaker_open() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .breaker(BreakerConfig {
            failures: 2,
            open_for: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    server.kill().unwrap();
    for key in 0..3 {
        let _ = cache.get(&key).await;
    }
    let started = Instant::now();
    let err = cache.set(&1, "v".into()).await.unwrap_err();
    assert!(
        matches!(err, Error::Remote(RemoteError::BreakerOpen)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    let err = cache.invalidate(&1).await.unwrap_err();
    assert!(
        matches!(err, Error::Remote(RemoteError::BreakerOpen)),
        "{err}"
    );
    // Reads go on without Redis.
    assert_eq!(
        cache.get_or_load(&9, ok("v")).await.unwrap().as_deref(),
        Some("v")
    );
}

/// docs: "after 5 failures in a row the circuit breaker opens".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_exactly_five_failures_in_a_row() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    server.kill().unwrap();
    let state = || capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "t")]);
    for key in 0..4 {
        assert!(cache.get(&key).await.is_ok());
    }
    assert_ne!(state(), Some(2.0), "open after 4 failures");
    assert!(cache.get(&4).await.is_ok());
    assert_eq!(state(), Some(2.0), "open after 5 failures");
}

/// docs: a half-open breaker "whose probe never reported (its caller was dropped)" lets another
/// call through: Redis is used again soon after it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_probe_does_not_keep_redis_skipped() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .breaker(BreakerConfig {
                failures: 1,
                open_for: Duration::from_millis(200),
            })
            .build()
            .unwrap()
    });
    server.kill().unwrap();
    let _ = cache.get(&1).await;
    let _ = cache.get(&1).await;
    server.restart().unwrap();
    sleep(Duration::from_millis(250)).await;
    // The probe's caller is dropped at its first poll.
    let _ = timeout(Duration::ZERO, cache.get(&1)).await;
    let started = Instant::now();
    eventually("Redis is written again", async || {
        let _ = cache.set(&1, "back".into()).await;
        raw_get(&server, "{brisk:t:1:i:1}").await.is_some()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// docs: a read never fails because of Redis; "another program's bytes" are a miss and the next
/// load overwrites them — here another program's list under the key.
#[tokio::test]
async fn another_programs_list_under_the_key_is_a_miss_and_is_overwritten() {
    let server = redis();
    server
        .command(&["RPUSH", "{brisk:t:1:i:1}", "a", "b"])
        .unwrap();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(
        cache.get_or_load(&1, ok("fresh")).await.unwrap().as_deref(),
        Some("fresh")
    );
    eventually("overwritten", async || {
        server
            .command(&["TYPE", "{brisk:t:1:i:1}"])
            .unwrap()
            .contains("string")
    })
    .await;
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("fresh"));
    // set and invalidate over another program's hash work too.
    server
        .command(&["HSET", "{brisk:t:1:i:2}", "f", "v"])
        .unwrap();
    cache.set(&2, "mine".into()).await.unwrap();
    assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("mine"));
    server
        .command(&["HSET", "{brisk:t:1:i:3}", "f", "v"])
        .unwrap();
    cache.invalidate(&3).await.unwrap();
}

/// docs (`set`): `Error::Remote` only when Redis "refused both the write and the removal".
/// A Redis out of memory refuses SET but still deletes: the old value is removed, no error.
#[tokio::test]
async fn set_on_a_redis_refusing_writes_removes_the_old_value() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    server
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .unwrap();
    let set = cache.set(&1, "new".into()).await;
    let raw = raw_get(&server, "{brisk:t:1:i:1}").await;
    server
        .command(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    assert!(set.is_ok(), "{set:?}");
    assert_eq!(raw, None, "the old value was left in Redis");
    assert_ne!(cache.get(&1).await.unwrap().as_deref(), Some("old"));
}

/// docs (`invalidate`): with Redis down, `Error::Remote`, and "the local entry is gone".
#[tokio::test]
async fn invalidate_on_a_dead_redis_reports_and_drops_the_local_entry() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    server.kill().unwrap();
    let err = cache.invalidate(&1).await.unwrap_err();
    assert!(matches!(err, Error::Remote(_)), "{err}");
    assert_eq!(cache.get(&1).await.unwrap(), None);
}

/// A value whose Redis key expires (or is deleted by another program) between two operations:
/// reads go on as misses.
#[tokio::test]
async fn a_key_expiring_between_operations_is_a_miss() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    server
        .command(&["PEXPIRE", "{brisk:t:1:i:1}", "1"])
        .unwrap();
    sleep(Duration::from_millis(20)).await;
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(
        cache.get_or_load(&1, ok("w")).await.unwrap().as_deref(),
        Some("w")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_reads_reload_and_writes_land() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    server.restart().unwrap();
    for _ in 0..20 {
        let got = cache.get_or_load(&1, ok("reloaded")).await;
        assert!(got.unwrap().is_some());
    }
    eventually("writes land", async || {
        let _ = cache.set(&2, "w".into()).await;
        raw_get(&server, "{brisk:t:1:i:2}").await.is_some()
    })
    .await;
}

/// The connection was made on a runtime that is gone: Redis is unusable, yet reads succeed and
/// writes report, and nothing hangs.
#[test]
fn a_cache_whose_connection_runtime_is_gone_still_answers() {
    let server = redis();
    let first = tokio::runtime::Runtime::new().unwrap();
    let cache: Cache<u64, String> = first.block_on(async {
        Cache::builder("t")
            .redis(connect(&server).await)
            .build()
            .unwrap()
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let got = timeout(Duration::from_secs(3), cache.get_or_load(&1, ok("v")))
            .await
            .expect("not stuck");
        assert_eq!(got.unwrap().as_deref(), Some("v"));
        let set = timeout(Duration::from_secs(3), cache.set(&2, "w".into())).await;
        assert!(set.is_ok(), "set hung");
    });
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// "its loader runs once in the process": callers on two runtimes at once.
#[test]
fn single_flight_holds_across_runtimes() {
    let cache = memory("t");
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (cache, runs, gate) = (cache.clone(), runs.clone(), gate.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let calls: Vec<_> = (0..50)
                        .map(|_| {
                            let (cache, load) = (cache.clone(), gated(&gate, &runs, "v"));
                            tokio::spawn(async move { cache.get_or_load(&1, load).await })
                        })
                        .collect();
                    let mut out = Vec::new();
                    for call in calls {
                        out.push(call.await.unwrap());
                    }
                    out
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    gate.add_permits(1);
    for thread in threads {
        for got in thread.join().unwrap() {
            assert_eq!(got.unwrap().as_deref(), Some("v"));
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_over_many_keys_loads_each_once() {
    let server = redis();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(redis)
        .local(LocalTier::entries(1_000))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..1_000_u64)
        .map(|i| {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                let key = i % 100;
                cache
                    .get_or_load(&key, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>(Some(format!("v{key}")))
                    })
                    .await
                    .map(|v| (key, v))
            })
        })
        .collect();
    for call in calls {
        let (key, v) = call.await.unwrap().unwrap();
        assert_eq!(v, Some(format!("v{key}")));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 100);
}

/// Two caches with the same name and different value types on one Redis (a misconfiguration
/// the docs warn about): misses and decode failures, never errors or wrong values.
#[tokio::test]
async fn two_caches_of_one_name_and_two_types_never_error() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let strings: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis.clone()).build().unwrap());
    let numbers: Cache<u64, u64> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    strings.set(&1, "text".into()).await.unwrap();
    assert_eq!(numbers.get(&1).await.unwrap(), None);
    let got = numbers
        .get_or_load(&1, async { Ok::<_, std::io::Error>(Some(5)) })
        .await
        .unwrap();
    assert_eq!(got, Some(5));
    eventually("overwritten", async || {
        strings.get(&1).await.unwrap().is_none()
    })
    .await;
    assert!(
        capture.counter(
            CACHE_DECODE_FAILURES.name,
            &[("cache", "t"), ("reason", "type")]
        ) >= 2
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn requests(capture: &Capture, tier: &str, outcome: &str) -> u64 {
    capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", "t"), ("tier", tier), ("outcome", outcome)],
    )
}

/// docs: `tier="remote"` is counted once "per read that got past the local tier and found no
/// load in progress"; `tier="local"` each lookup.
#[tokio::test(start_paused = true)]
async fn request_metrics_count_each_tier_a_lookup_reached() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    });
    assert_eq!(
        cache.get_or_load(&1, ok("v")).await.unwrap().as_deref(),
        Some("v")
    );
    assert_eq!(
        (
            requests(&capture, "local", "miss"),
            requests(&capture, "remote", "miss")
        ),
        (1, 1)
    );
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    assert_eq!(requests(&capture, "local", "hit"), 1);
    assert_eq!(requests(&capture, "remote", "hit"), 0);
    // Ten callers of a key being loaded: ten local misses, one remote lookup.
    let calls: Vec<_> = (0..10)
        .map(|_| cache.get_or_load(&2, slow(Duration::from_millis(10), "w")))
        .collect();
    for got in futures_util::future::join_all(calls).await {
        assert_eq!(got.unwrap().as_deref(), Some("w"));
    }
    assert_eq!(requests(&capture, "local", "miss"), 11);
    assert_eq!(requests(&capture, "remote", "miss"), 2);
}

#[tokio::test(start_paused = true)]
async fn remote_hits_are_counted_without_a_local_tier() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| Cache::builder("t").build().unwrap());
    cache.set(&1, "v".into()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    assert_eq!(cache.get(&2).await.unwrap(), None);
    assert_eq!(requests(&capture, "remote", "hit"), 1);
    assert_eq!(requests(&capture, "remote", "miss"), 1);
    assert_eq!(
        requests(&capture, "local", "hit") + requests(&capture, "local", "miss"),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn load_metrics_count_every_outcome_and_duration() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .hard_timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    });
    let _ = cache
        .get_or_load(&1, slow(Duration::from_secs(1), "v"))
        .await;
    let _ = cache
        .get_or_load(&2, async { Ok::<_, std::io::Error>(None) })
        .await;
    let _ = cache.get_or_load(&3, fail()).await;
    let _ = cache
        .get_or_load(&4, slow(Duration::from_secs(60), "late"))
        .await;
    let _ = cache
        .get_or_load(&5, async {
            if true {
                panic!("p");
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
    for outcome in ["loaded", "none", "error", "timeout", "panic"] {
        assert_eq!(
            capture.counter(CACHE_LOADS.name, &[("cache", "t"), ("outcome", outcome)]),
            1,
            "{outcome}"
        );
    }
    let durations = capture.histogram(CACHE_LOAD_DURATION.name, &[("cache", "t")]);
    assert!(durations.contains(&1.0), "{durations:?}");
    assert!(
        durations.len() >= 2 && durations.len() <= 5,
        "{durations:?}"
    );
}

#[tokio::test]
async fn remote_durations_are_recorded_per_operation() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    cache.set(&1, "v".into()).await.unwrap();
    let _ = cache.get(&1).await.unwrap();
    cache.invalidate(&1).await.unwrap();
    // The hit's GET, and the read of the cache's `clear` time that its first hit makes.
    for (op, count) in [("get", 2), ("set", 1), ("del", 1)] {
        let samples = capture.histogram(
            CACHE_REMOTE_DURATION.name,
            &[("cache", "t"), ("operation", op)],
        );
        assert_eq!(samples.len(), count, "{op}: {samples:?}");
    }
}

#[tokio::test]
async fn a_remote_error_is_counted_as_outcome_error() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    server.kill().unwrap();
    assert_eq!(
        cache.get_or_load(&1, ok("v")).await.unwrap().as_deref(),
        Some("v")
    );
    assert_eq!(requests(&capture, "remote", "error"), 1);
    assert_eq!(requests(&capture, "remote", "miss"), 0);
}

// ---------------------------------------------------------------------------------------------
// Misc promises
// ---------------------------------------------------------------------------------------------

/// A loader that returns a huge value: over `max_value_size`, kept out of Redis, served.
#[tokio::test]
async fn a_huge_loaded_value_is_served_and_kept_out_of_redis() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .local(LocalTier::entries(10))
            .build()
            .unwrap()
    });
    let huge = "z".repeat(2 << 20);
    let got = cache.get_or_load(&1, ok(&huge)).await.unwrap();
    assert_eq!(got.map(|v| v.len()), Some(2 << 20));
    eventually("counted", async || {
        capture.counter(CACHE_OVERSIZE.name, &[("cache", "t")]) == 1
    })
    .await;
    assert_eq!(raw_get(&server, "{brisk:t:1:i:1}").await, None);
    assert_eq!(
        cache.get(&1).await.unwrap().map(|v| v.len()),
        Some(2 << 20),
        "the local tier keeps it"
    );
}

/// A panic with a non-string payload is still `Panicked`, and the key recovers.
#[tokio::test]
async fn a_loader_panicking_with_any_payload_is_panicked() {
    let cache = memory("t");
    let got = cache
        .get_or_load(&1, async {
            sleep(Duration::from_millis(1)).await;
            std::panic::panic_any(42_u32);
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(None)
        })
        .await;
    assert!(matches!(got, Err(Error::Panicked { .. })), "{got:?}");
    assert_eq!(
        cache.get_or_load(&1, ok("v")).await.unwrap().as_deref(),
        Some("v")
    );
}

/// A registered loader whose future panics after awaiting, and errors: each is its error.
#[tokio::test]
async fn a_registered_loader_that_panics_or_fails_later_is_contained() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .loader(|key: u64| async move {
            sleep(Duration::from_millis(1)).await;
            match key {
                1 => panic!("later"),
                2 => Err(std::io::Error::other("no")),
                _ => Ok(Some(key.to_string())),
            }
        })
        .build()
        .unwrap();
    assert!(matches!(cache.get(&1).await, Err(Error::Panicked { .. })));
    assert!(matches!(cache.get(&2).await, Err(Error::Load(_))));
    assert_eq!(cache.get(&3).await.unwrap().as_deref(), Some("3"));
    // A get_or_load on a read-through cache uses the given future.
    assert_eq!(
        cache.get_or_load(&4, ok("given")).await.unwrap().as_deref(),
        Some("given")
    );
}

/// A `set` with an expired deadline on the in-memory tier, which never waits, still stores (or
/// reports that it could not).
#[tokio::test(start_paused = true)]
async fn set_under_an_expired_deadline_in_memory_stores_or_reports() {
    for cache in [memory("t"), memory_local("t")] {
        cache.set(&1, "old".into()).await.unwrap();
        let set = deadline::scope(Instant::now(), cache.set(&1, "new".into())).await;
        let now = cache.get(&1).await.unwrap();
        match set {
            Ok(()) => assert_eq!(now.as_deref(), Some("new"), "{cache:?}"),
            Err(Error::Remote(_)) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
}

/// A good envelope copied under another cache's key is that key's business; the original key
/// of the other cache stays a miss.
#[tokio::test]
async fn an_entry_copied_from_another_cache_name_is_served_only_under_its_key() {
    let server = redis();
    let redis = connect(&server).await;
    let a: Cache<u64, String> = Cache::builder("a").redis(redis.clone()).build().unwrap();
    let b: Cache<u64, String> = Cache::builder("b").redis(redis).build().unwrap();
    a.set(&1, "from a".into()).await.unwrap();
    let bytes = raw_get(&server, "{brisk:a:1:i:1}").await.unwrap();
    raw_set(&server, "{brisk:b:1:i:2}", &bytes).await;
    // Same type, same codec: the envelope is valid for b as well — it is served under b's key 2.
    let got = b.get(&2).await.unwrap();
    assert!(matches!(got.as_deref(), None | Some("from a")));
    assert_eq!(b.get(&1).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Crafted envelopes: "any decode failure is a miss plus a metric, never a panic or an error"
// (DESIGN §2). Layout as observed: "bk", version, flags, codec, fingerprint (8), made (8, Unix
// ms), fresh until (8, Unix ms), load time (4), payload length (4), payload.
// ---------------------------------------------------------------------------------------------

async fn envelope_of(
    server: &brisk_testkit::RedisServer,
    cache: &Cache<u64, String>,
    value: &str,
) -> Vec<u8> {
    cache.set(&1, value.to_owned()).await.unwrap();
    raw_get(server, "{brisk:t:1:i:1}").await.unwrap()
}

/// Reads of `bytes` under key 1 are `Ok`, never a panic; the key can then be loaded again.
async fn survives(
    server: &brisk_testkit::RedisServer,
    cache: &Cache<u64, String>,
    bytes: &[u8],
    what: &str,
) {
    cache.invalidate(&1).await.unwrap();
    raw_set(server, "{brisk:t:1:i:1}", bytes).await;
    let got = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&1).await }
    })
    .await;
    assert!(matches!(got, Ok(Ok(_))), "{what}: get: {got:?}");
    let got = tokio::spawn({
        let cache = cache.clone();
        async move { timeout(Duration::from_secs(2), cache.get_or_load(&1, fail())).await }
    })
    .await;
    assert!(
        matches!(got, Ok(Ok(Ok(_) | Err(Error::Load(_))))),
        "{what}: get_or_load: {got:?}"
    );
    let got = tokio::spawn({
        let cache = cache.clone();
        async move { timeout(Duration::from_secs(2), cache.get(&1)).await }
    })
    .await;
    assert!(matches!(got, Ok(Ok(Ok(_)))), "{what}: second get: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_times_in_an_envelope_are_never_a_panic() {
    let server = redis();
    let redis = connect(&server).await;
    for local in [false, true] {
        let cache: Cache<u64, String> = {
            let b = Cache::builder("t")
                .redis(redis.clone())
                .ttl(Duration::from_secs(10))
                .stale_for(Duration::from_secs(60))
                .soft_timeout(Duration::from_millis(50));
            if local {
                b.local(LocalTier::entries(10))
            } else {
                b
            }
            .build()
            .unwrap()
        };
        let good = envelope_of(&server, &cache, "v").await;
        for (field, range) in [("made", 13..21), ("fresh until", 21..29)] {
            for value in [0, 1, u64::MAX, i64::MAX as u64, 1 << 63, u64::MAX - 1_000] {
                let mut bytes = good.clone();
                bytes[range.clone()].copy_from_slice(&value.to_le_bytes());
                survives(
                    &server,
                    &cache,
                    &bytes,
                    &format!("local {local}: {field} = {value}"),
                )
                .await;
            }
        }
        for value in [0, u32::MAX] {
            let mut bytes = good.clone();
            bytes[29..33].copy_from_slice(&value.to_le_bytes());
            survives(
                &server,
                &cache,
                &bytes,
                &format!("local {local}: load time = {value}"),
            )
            .await;
            let mut bytes = good.clone();
            bytes[33..37].copy_from_slice(&value.to_le_bytes());
            survives(
                &server,
                &cache,
                &bytes,
                &format!("local {local}: payload length = {value}"),
            )
            .await;
        }
        // Every single byte of the header at 0x00 and 0xFF.
        for at in 0..37 {
            for byte in [0x00, 0xFF] {
                let mut bytes = good.clone();
                bytes[at] = byte;
                survives(
                    &server,
                    &cache,
                    &bytes,
                    &format!("local {local}: byte {at} = {byte:#x}"),
                )
                .await;
            }
        }
        cache.set(&5, "still works".into()).await.unwrap();
        assert_eq!(cache.get(&5).await.unwrap().as_deref(), Some("still works"));
    }
}

/// A compressed payload that claims a 4 GiB original size: a miss, counted, no allocation of
/// 4 GiB, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_a_counted_miss() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .codec(Codec::Json)
            .compress_above(10)
            .build()
            .unwrap()
    });
    let good = envelope_of(&server, &cache, &"a".repeat(100)).await;
    assert_eq!(good[3], 2, "compressed: {good:?}");
    for claimed in [u32::MAX, 1 << 30, 0] {
        let mut bytes = good[..37].to_vec();
        let mut payload = claimed.to_le_bytes().to_vec();
        payload.extend_from_slice(&good[41..]);
        bytes[33..37].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(&payload);
        survives(&server, &cache, &bytes, &format!("claimed {claimed}")).await;
    }
    // The compressed flag on a payload that is not compressed.
    let plain: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .codec(Codec::Json)
        .compress_above(10)
        .build()
        .unwrap();
    let mut bytes = good[..37].to_vec();
    let payload = br#""plain""#;
    bytes[33..37].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    bytes.extend_from_slice(payload);
    survives(&server, &plain, &bytes, "flag without compression").await;
    assert!(
        capture.counter(
            CACHE_DECODE_FAILURES.name,
            &[("cache", "t"), ("reason", "payload")]
        ) + capture.counter(
            CACHE_DECODE_FAILURES.name,
            &[("cache", "t"), ("reason", "truncated")]
        ) >= 3
    );
}

/// docs: "A value whose envelope exceeds `max_value_size` ... is kept out of Redis": with
/// compression the envelope is the compressed one; a value that compresses below the limit is
/// stored.
#[tokio::test]
async fn max_value_size_applies_to_the_compressed_envelope() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .compress_above(100)
            .max_value_size(1_000)
            .build()
            .unwrap()
    });
    cache.set(&1, "a".repeat(10_000)).await.unwrap();
    let raw = raw_get(&server, "{brisk:t:1:i:1}").await;
    assert_eq!(capture.counter(CACHE_OVERSIZE.name, &[("cache", "t")]), 0);
    assert!(
        raw.is_some_and(|r| r.len() < 1_000),
        "kept out though its envelope is small"
    );
    assert_eq!(cache.get(&1).await.unwrap().map(|v| v.len()), Some(10_000));
}

#[test]
fn compress_above_zero_is_refused_or_works() {
    let built = Cache::<u64, String>::builder("t").compress_above(0).build();
    if let Err(err) = &built {
        assert!(err.to_string().contains("compress"), "{err}");
    }
    if let Ok(cache) = built {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            cache.set(&1, String::new()).await.unwrap();
            assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some(""));
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Weighers
// ---------------------------------------------------------------------------------------------

/// docs: the weigher is "called once per insert".
#[tokio::test]
async fn the_weigher_is_called_once_per_insert() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<u64, String> = Cache::builder("t")
        .local(LocalTier::weighted(1_000, {
            let calls = calls.clone();
            move |_k: &u64, v: &String| {
                calls.fetch_add(1, Ordering::SeqCst);
                v.len() as u64
            }
        }))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap(); // insert 1
    let _ = cache.get(&1).await.unwrap(); // hit
    cache.set(&1, "w".into()).await.unwrap(); // insert 2 (replaces)
    cache.invalidate(&1).await.unwrap(); // removal
    let _ = cache.get(&1).await.unwrap(); // miss, nothing loaded
    let _ = cache.get_or_load(&2, ok("x")).await.unwrap(); // insert 3
    let _ = cache.get(&2).await.unwrap(); // hit
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A weigher that answers differently each time (user code that misbehaves): the local tier's
/// accounting must not break — no panic, the cache keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inconsistent_weigher_does_not_break_the_local_tier() {
    let n = Arc::new(AtomicUsize::new(0));
    let cache: Cache<u64, String> = Cache::builder("t")
        .local(LocalTier::weighted(100, {
            let n = n.clone();
            move |_k: &u64, _v: &String| (n.fetch_add(7, Ordering::SeqCst) % 50) as u64
        }))
        .build()
        .unwrap();
    for round in 0..2_000_u64 {
        let key = round % 37;
        let cache = cache.clone();
        let outcome = tokio::spawn(async move {
            match round % 4 {
                0 => cache.set(&key, "v".into()).await.map(drop),
                1 => cache.invalidate(&key).await,
                2 => cache.get(&key).await.map(drop),
                _ => cache.get_or_load(&key, ok("l")).await.map(drop),
            }
        })
        .await;
        assert!(matches!(outcome, Ok(Ok(()))), "round {round}: {outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_huge_weights_mixed_do_not_break_the_local_tier() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .local(LocalTier::weighted(50, |k: &u64, _v: &String| {
            match k % 3 {
                0 => 0,
                1 => u64::MAX,
                _ => 10,
            }
        }))
        .build()
        .unwrap();
    for key in 0..500_u64 {
        cache.set(&key, "v".into()).await.unwrap();
        assert_eq!(cache.get(&key).await.unwrap().as_deref(), Some("v"));
        if key % 5 == 0 {
            cache.invalidate(&key).await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Freshness across processes
// ---------------------------------------------------------------------------------------------

/// The local tier keeps an entry "the local TTL, or the value's freshness if that ends first":
/// a value another process wrote with a short TTL is not served past it.
#[tokio::test]
async fn a_local_entry_does_not_outlive_the_freshness_another_process_gave_it() {
    let server = redis();
    let redis = connect(&server).await;
    let writer: Cache<u64, String> = Cache::builder("t")
        .redis(redis.clone())
        .ttl(Duration::from_millis(300))
        .build()
        .unwrap();
    let reader: Cache<u64, String> = Cache::builder("t")
        .redis(redis)
        .ttl(Duration::from_secs(60))
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    writer.set(&1, "v".into()).await.unwrap();
    assert_eq!(reader.get(&1).await.unwrap().as_deref(), Some("v"));
    sleep(Duration::from_millis(400)).await;
    assert_eq!(
        reader.get(&1).await.unwrap(),
        None,
        "served past its freshness"
    );
}

/// A stale value in Redis stands in for a failed load (real time, Redis remote).
#[tokio::test]
async fn a_stale_value_in_redis_stands_in_for_a_failed_load() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .ttl(Duration::from_millis(200))
            .stale_for(Duration::from_secs(10))
            .build()
            .unwrap()
    });
    cache.set(&1, "old".into()).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    assert_eq!(cache.get(&1).await.unwrap(), None, "not fresh");
    assert_eq!(
        cache.get_or_load(&1, fail()).await.unwrap().as_deref(),
        Some("old")
    );
    assert_eq!(requests_of(&capture, "remote", "stale"), 1);
}

fn requests_of(capture: &Capture, tier: &str, outcome: &str) -> u64 {
    capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", "t"), ("tier", tier), ("outcome", outcome)],
    )
}

/// A background refresh (past the soft timeout) that lands after a `set` must not overwrite it.
#[tokio::test(start_paused = true)]
async fn a_background_refresh_does_not_overwrite_a_later_set() {
    for local in [false, true] {
        let cache = stale_cache(&Capture::new(), local);
        cache.set(&1, "old".into()).await.unwrap();
        advance(Duration::from_secs(2)).await;
        let got = cache
            .get_or_load(&1, slow(Duration::from_secs(1), "refreshed"))
            .await;
        assert_eq!(got.unwrap().as_deref(), Some("old"));
        cache.set(&1, "written".into()).await.unwrap();
        // The refresh lands at 1 s after it began; "written" is fresh for 1 s after the set.
        sleep(Duration::from_millis(950)).await;
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("written"),
            "local {local}"
        );
    }
}

/// Redis as a read-only replica: SET and DEL both refused — `set` must report it.
#[tokio::test]
async fn set_on_a_read_only_redis_reports_that_the_old_value_may_remain() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    server.command(&["REPLICAOF", "127.0.0.1", "1"]).unwrap();
    let set = cache.set(&1, "new".into()).await;
    let invalidate = cache.invalidate(&1).await;
    let write = cache
        .write_through(&1, "newer".into(), async { Ok::<_, std::io::Error>(()) })
        .await;
    server.command(&["REPLICAOF", "NO", "ONE"]).unwrap();
    assert!(matches!(set, Err(Error::Remote(_))), "{set:?}");
    assert!(
        matches!(invalidate, Err(Error::Remote(_))),
        "{invalidate:?}"
    );
    assert!(matches!(write, Err(Error::Remote(_))), "{write:?}");
}

// ---------------------------------------------------------------------------------------------
// More documented promises
// ---------------------------------------------------------------------------------------------

/// docs table: Redis down — a read "goes on as a miss: the local tier and the loader serve";
/// "A read never fails because of Redis". A value still fresh by the cache's TTL, held locally
/// past its local recheck time, is what Redis would have served: a failing loader must not turn
/// that into an error just because Redis is down.
#[tokio::test]
async fn with_redis_down_a_fresh_local_value_is_served_rather_than_a_failed_load() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .ttl(Duration::from_secs(60))
        .local(LocalTier::entries(10).ttl(Duration::from_millis(200)))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    // With Redis up, past the local TTL, the read is served (Redis has it fresh).
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cache.get_or_load(&1, fail()).await.unwrap().as_deref(),
        Some("v")
    );
    sleep(Duration::from_millis(300)).await;
    server.kill().unwrap();
    let got = cache.get_or_load(&1, fail()).await;
    assert_eq!(
        got.unwrap().as_deref(),
        Some("v"),
        "the read failed because Redis is down"
    );
}

/// docs: "5 failures in a row" — a success in between starts the count again. The failures
/// here are reads timing out on a paused server. (They were WRONGTYPE replies from a key another
/// program made a list, until reads shared one MGET, which reads such a key as missing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_failures_in_a_row_only() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .remote_timeout(Duration::from_millis(50))
            .breaker(BreakerConfig {
                failures: 3,
                open_for: Duration::from_secs(30),
            })
            .build()
            .unwrap()
    });
    cache.set(&2, "v".into()).await.unwrap();
    let state = || capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "t")]);
    for _ in 0..3 {
        server.pause().unwrap();
        let _ = cache.get(&1).await.unwrap();
        let _ = cache.get(&1).await.unwrap();
        server.resume().unwrap();
        assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("v"));
    }
    assert_ne!(state(), Some(2.0), "opened without 3 failures in a row");
    server.pause().unwrap();
    for _ in 0..3 {
        let _ = cache.get(&1).await.unwrap();
    }
    server.resume().unwrap();
    assert_eq!(state(), Some(2.0), "3 in a row open it");
}

/// `get`, `set`, `invalidate` and `write_through` on the in-memory tier do not load: outside a
/// runtime they work (their documented errors do not include `NoRuntime`) and never panic.
#[test]
fn operations_that_do_not_load_work_outside_a_runtime() {
    use futures_util::FutureExt as _;
    for cache in [memory("t"), memory_local("t")] {
        let set = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.set(&1, "v".into()).now_or_never()
        }));
        assert!(matches!(set, Ok(Some(Ok(())))), "set: {set:?}");
        let get = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.get(&1).now_or_never()
        }));
        assert!(
            matches!(&get, Ok(Some(Ok(Some(v)))) if v == "v"),
            "get: {get:?}"
        );
        let wt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache
                .write_through(&1, "w".into(), async { Ok::<_, std::io::Error>(()) })
                .now_or_never()
        }));
        assert!(matches!(wt, Ok(Some(Ok(())))), "write_through: {wt:?}");
        let inv = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.invalidate(&1).now_or_never()
        }));
        assert!(matches!(inv, Ok(Some(Ok(())))), "invalidate: {inv:?}");
    }
}

/// "past it the loader is dropped": the loader's future really is dropped at the hard timeout,
/// even with every caller gone.
#[tokio::test(start_paused = true)]
async fn the_loader_is_dropped_at_the_hard_timeout() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let cache: Cache<u64, String> = Cache::builder("t")
        .hard_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let load = {
        let flag = Flag(dropped.clone());
        async move {
            let _flag = flag;
            std::future::pending::<R>().await
        }
    };
    let _ = timeout(Duration::from_millis(10), cache.get_or_load(&1, load)).await;
    sleep(Duration::from_millis(1_980)).await;
    assert!(!dropped.load(Ordering::SeqCst), "dropped early");
    sleep(Duration::from_millis(30)).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "still running past the hard timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn the_default_hard_timeout_is_ten_seconds() {
    let cache = memory("t");
    let started = Instant::now();
    let got = cache
        .get_or_load(&1, slow(Duration::from_secs(3_600), "v"))
        .await;
    assert!(
        matches!(got, Err(Error::LoadTimeout { after }) if after == Duration::from_secs(10)),
        "{got:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_remote_timeout_is_a_hundred_milliseconds() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let err = cache.invalidate(&1).await.unwrap_err();
    let took = started.elapsed();
    server.resume().unwrap();
    match err {
        Error::Remote(RemoteError::Timeout(e)) => assert_eq!(e.after(), Duration::from_millis(100)),
        other => panic!("{other}"),
    }
    assert!(took >= Duration::from_millis(100), "{took:?}");
}

#[tokio::test]
async fn the_default_max_key_len_is_1024_encoded_bytes() {
    let cache: Cache<String, String> = Cache::builder("t").build().unwrap();
    let fits = "x".repeat(1_022); // "s:" + 1,022 = 1,024
    cache.set(&fits, "v".into()).await.unwrap();
    let over = "x".repeat(1_023);
    let err = cache.set(&over, "v".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Key(KeyError::TooLong {
                len: 1_025,
                max: 1_024
            })
        ),
        "{err}"
    );
}

/// The error says which bound fired, in its text too.
#[tokio::test(start_paused = true)]
async fn deadline_and_timeout_errors_say_which_fired() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .hard_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let deadline_err = deadline::scope(
        Instant::now() + Duration::from_millis(10),
        cache.get_or_load(&1, slow(Duration::from_secs(5), "v")),
    )
    .await
    .unwrap_err();
    assert!(
        deadline_err.to_string().contains("deadline"),
        "{deadline_err}"
    );
    let timeout_err = cache
        .get_or_load(&2, slow(Duration::from_secs(5), "v"))
        .await
        .unwrap_err();
    assert!(
        timeout_err.to_string().contains("hard timeout"),
        "{timeout_err}"
    );
    assert!(
        !timeout_err.to_string().contains("deadline"),
        "{timeout_err}"
    );
}

/// docs: `negative_ttl` "zero caches none" — on every shape, the local tier included.
#[tokio::test]
async fn a_zero_negative_ttl_caches_no_absence_on_any_shape() {
    let server = redis();
    for (shape, cache) in common::every_shape(&server, |b| b.negative_ttl(Duration::ZERO)).await {
        let runs = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let runs = runs.clone();
            let got = cache
                .get_or_load(&1, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<Option<String>, std::io::Error>(None)
                })
                .await;
            assert_eq!(got.unwrap(), None);
            sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3, "{shape}");
    }
}

/// `LocalTier::entries(n)`: "At most `n` entries".
#[tokio::test]
async fn the_local_tier_holds_at_most_n_entries() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::entries(10))
            .build()
            .unwrap()
    });
    for key in 0..1_000 {
        cache.set(&key, "v".into()).await.unwrap();
    }
    for key in 0..1_000 {
        let _ = cache.get(&key).await.unwrap();
    }
    let hits = local_hits(&capture);
    assert!(hits <= 10, "{hits} local hits from a tier of 10 entries");
    let entries = capture
        .gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "t")])
        .unwrap_or(0.0);
    assert!(entries <= 10.0, "{entries} entries in a tier of 10");
}

/// `LocalTier::weighted`: "At most `capacity` in total weight".
#[tokio::test]
async fn the_weighted_local_tier_holds_at_most_its_capacity() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .local(LocalTier::weighted(100, |_k: &u64, v: &String| {
                v.len() as u64
            }))
            .build()
            .unwrap()
    });
    for key in 0..1_000 {
        cache.set(&key, "x".repeat(10)).await.unwrap();
    }
    for key in 0..1_000 {
        let _ = cache.get(&key).await.unwrap();
    }
    let hits = local_hits(&capture);
    assert!(
        hits <= 10,
        "{hits} local hits of weight 10 from a tier of weight 100"
    );
}

/// "a remote read that started before [a write] does not fill the local tier with what it
/// read": a read waiting on Redis while a `set` lands must not leave the old value locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_read_that_started_before_a_set_does_not_fill_the_local_tier() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .remote_timeout(Duration::from_secs(2))
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    cache.invalidate(&1).await.unwrap();
    let other: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    other.set(&1, "old".into()).await.unwrap();
    server.pause().unwrap();
    let reader = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&1).await }
    });
    sleep(Duration::from_millis(50)).await;
    let writer = tokio::spawn({
        let cache = cache.clone();
        async move { cache.set(&1, "new".into()).await }
    });
    sleep(Duration::from_millis(50)).await;
    server.resume().unwrap();
    let _ = reader.await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("new"));
}

// ---------------------------------------------------------------------------------------------
// Races right after a load answers: the load's task still fills the tiers after its waiters
// are answered ("Its value goes to every waiter and the local tier, then to Redis"). A write
// that the caller makes after it got the value must still win.
// ---------------------------------------------------------------------------------------------

/// A weigher that is slow for loaded values: it holds the load's task inside its local insert,
/// which comes after the load answered its waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_right_after_a_load_answers_is_not_overwritten_by_its_local_insert() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .local(LocalTier::weighted(1_000_000, |_k: &u64, v: &String| {
            if v == "loaded" {
                std::thread::sleep(Duration::from_millis(100));
            }
            1
        }))
        .build()
        .unwrap();
    let mut lost = Vec::new();
    for key in 0..5_u64 {
        let got = cache.get_or_load(&key, ok("loaded")).await.unwrap();
        assert_eq!(got.as_deref(), Some("loaded"));
        cache.set(&key, "written".into()).await.unwrap();
        sleep(Duration::from_millis(200)).await;
        let now = cache.get(&key).await.unwrap();
        if now.as_deref() != Some("written") {
            lost.push((key, now));
        }
    }
    assert!(
        lost.is_empty(),
        "sets lost to the load that answered before them: {lost:?}"
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Write {
    Set,
    Invalidate,
}

/// Loads `rounds` keys with a 200 kB value; right after each `get_or_load` answers, writes the
/// key (`set` "written" or `invalidate`). Returns where the load's value came back afterwards.
async fn race_after_load(
    cache: &Cache<u64, String>,
    write: Write,
    server: Option<&brisk_testkit::RedisServer>,
) -> Vec<String> {
    let big = "b".repeat(200_000);
    let mut lost = Vec::new();
    for key in 0..200_u64 {
        let got = cache.get_or_load(&key, ok(&big)).await.unwrap();
        assert_eq!(got.map(|v| v.len()), Some(200_000));
        match write {
            Write::Set => cache.set(&key, "written".into()).await.unwrap(),
            Write::Invalidate => cache.invalidate(&key).await.unwrap(),
        }
    }
    sleep(Duration::from_millis(300)).await;
    let expected = match write {
        Write::Set => Some("written"),
        Write::Invalidate => None,
    };
    for key in 0..200_u64 {
        let got = cache.get(&key).await.unwrap();
        if got.as_deref() != expected {
            lost.push(format!(
                "{write:?} key {key}: get gave {:?} bytes",
                got.map(|v| v.len())
            ));
        }
        if let Some(server) = server {
            let raw = raw_get(server, &format!("{{brisk:{}:1:i:{key}}}", cache.name())).await;
            if raw.as_ref().is_some_and(|r| r.len() > 100_000) {
                lost.push(format!("{write:?} key {key}: Redis holds the load's value"));
            }
        }
    }
    lost
}

/// `set`/`invalidate` win over a load: a caller that got a loaded value and then wrote the key
/// must not find the loaded value back afterwards (200 rounds per shape; the race is narrow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_right_after_a_load_answers_is_not_undone_by_the_load() {
    let server = redis();
    let redis = connect(&server).await;
    let mut report = Vec::new();
    for write in [Write::Set, Write::Invalidate] {
        let n = write as u8;
        let shapes: Vec<(&str, Cache<u64, String>, bool)> = vec![
            ("memory", memory(&format!("m{n}")), false),
            ("memory+local", memory_local(&format!("ml{n}")), false),
            (
                "redis",
                Cache::builder(&format!("r{n}"))
                    .redis(redis.clone())
                    .build()
                    .unwrap(),
                true,
            ),
            (
                "redis+local",
                Cache::builder(&format!("rl{n}"))
                    .redis(redis.clone())
                    .local(LocalTier::entries(1_000))
                    .build()
                    .unwrap(),
                true,
            ),
        ];
        for (shape, cache, remote) in shapes {
            let lost = race_after_load(&cache, write, remote.then_some(&server)).await;
            if !lost.is_empty() {
                report.push(format!("{shape}: {} (first: {})", lost.len(), lost[0]));
            }
        }
    }
    assert!(
        report.is_empty(),
        "writes undone by the load they followed: {report:#?}"
    );
}
