//! One load per key in this process, however its callers behave.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_cache::{Cache, Error};
use brisk_metrics::catalog::CACHE_LOADS;
use brisk_metrics::testing::Capture;
use common::{Source, every_shape, io_error, redis};
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_load_once() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        let source = Source::default();
        let gate = Arc::new(Semaphore::new(0));
        let callers: Vec<_> = (0..1_000)
            .map(|_| {
                let (cache, source, gate) = (cache.clone(), source.clone(), gate.clone());
                tokio::spawn(async move {
                    let load = source.load("v");
                    cache
                        .get_or_load(&1, async move {
                            let _open = gate.acquire().await;
                            load.await
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.add_permits(1);
        for caller in callers {
            assert_eq!(
                caller.await.unwrap().unwrap().as_deref(),
                Some("v"),
                "{shape}"
            );
        }
        assert_eq!(source.count(), 1, "{shape}: one load for 1,000 callers");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_caller_does_not_cancel_the_load() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let source = Source::default();
    let slow = {
        let load = source.load("v");
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            load.await
        }
    };
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load(&1, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = tokio::spawn({
        let (cache, source) = (cache.clone(), source.clone());
        async move { cache.get_or_load(&1, source.load("other")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(
        second.await.unwrap().unwrap().as_deref(),
        Some("v"),
        "the load went on"
    );
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("v"),
        "and filled the cache"
    );
    assert_eq!(source.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_load_whose_every_caller_left_still_fills_the_cache() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let source = Source::default();
    let load = source.load("v");
    let _ = tokio::time::timeout(
        Duration::from_millis(10),
        cache.get_or_load(&1, async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            load.await
        }),
    )
    .await
    .unwrap_err();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn a_panicking_loader_fails_its_waiters_and_the_key_recovers() {
    let capture = Capture::new();
    let cache: Cache<u64, String> = capture.run(|| Cache::builder("t").build().unwrap());
    let gate = Arc::new(Semaphore::new(0));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let (cache, gate) = (cache.clone(), gate.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&1, async move {
                        let _open = gate.acquire().await;
                        if true {
                            panic!("the loader broke");
                        }
                        Ok::<_, std::io::Error>(None)
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(1);
    for waiter in waiters {
        match waiter.await.unwrap() {
            Err(Error::Panicked { message }) => assert_eq!(&*message, "the loader broke"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        capture.counter(CACHE_LOADS.name, &[("cache", "t"), ("outcome", "panic")]),
        1
    );
    common::assert_loads_again(&cache, 1).await;
}

#[tokio::test]
async fn a_registered_loader_that_panics_building_its_future_is_contained() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .loader(|key: u64| {
            assert!(key != 13, "unlucky");
            async move { Ok::<_, std::io::Error>(Some(key.to_string())) }
        })
        .build()
        .unwrap();
    assert!(matches!(cache.get(&13).await, Err(Error::Panicked { .. })));
    assert_eq!(cache.get(&12).await.unwrap().as_deref(), Some("12"));
}

#[tokio::test]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let (cache, gate, calls) = (cache.clone(), gate.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&1, async move {
                        let _open = gate.acquire().await;
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err::<Option<String>, _>(io_error("db down"))
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(1);
    for waiter in waiters {
        let err = waiter.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Load(_)), "{err}");
        assert_eq!(err.to_string(), "the loader failed: db down");
        let source = std::error::Error::source(&err).unwrap();
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "the loader's error, typed"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    common::assert_loads_again(&cache, 1).await;
}

#[test]
fn a_load_on_a_runtime_that_shuts_down_fails_its_waiters_elsewhere() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let started = Arc::new(Semaphore::new(0));
    doomed.spawn({
        let (cache, started) = (cache.clone(), started.clone());
        async move {
            cache
                .get_or_load(&1, async move {
                    started.add_permits(1);
                    std::future::pending::<Result<Option<String>, std::io::Error>>().await
                })
                .await
        }
    });
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    other.block_on(async {
        let _ = started.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load(&1, async { Ok::<_, std::io::Error>(Some("x".to_owned())) })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        doomed.shutdown_background();
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("answered")
            .unwrap();
        assert!(matches!(outcome, Err(Error::Cancelled)), "{outcome:?}");
        // The key is free again.
        let again = cache
            .get_or_load(&1, async { Ok::<_, std::io::Error>(Some("y".to_owned())) })
            .await;
        assert_eq!(again.unwrap().as_deref(), Some("y"));
    });
}

#[test]
fn outside_a_runtime_a_miss_is_an_error() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let outcome = futures_util::FutureExt::now_or_never(
        cache.get_or_load(&1, async { Ok::<_, std::io::Error>(Some("x".to_owned())) }),
    );
    assert!(
        matches!(outcome, Some(Err(Error::NoRuntime))),
        "{outcome:?}"
    );
}
