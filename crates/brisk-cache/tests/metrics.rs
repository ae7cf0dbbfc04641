//! Each metric counts what `docs/caching.md` says it counts.

mod common;

use std::time::Duration;

use brisk_cache::{Cache, LocalTier};
use brisk_metrics::catalog::{
    CACHE_BREAKER_STATE, CACHE_LOAD_DURATION, CACHE_LOADS, CACHE_LOCAL_ENTRIES,
    CACHE_REMOTE_DURATION, CACHE_REQUESTS,
};
use brisk_metrics::testing::Capture;
use common::{Source, connect, redis};

fn requests(capture: &Capture, tier: &str, outcome: &str) -> u64 {
    capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", "m"), ("tier", tier), ("outcome", outcome)],
    )
}

#[tokio::test]
async fn lookups_count_per_tier_and_loads_per_outcome() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("m")
            .redis(redis)
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    });
    assert_eq!(
        capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "m")]),
        Some(0.0)
    );
    let source = Source::default();
    // A miss everywhere, loaded.
    cache.get_or_load(&1, source.load("one")).await.unwrap();
    assert_eq!(
        (
            requests(&capture, "local", "miss"),
            requests(&capture, "remote", "miss")
        ),
        (1, 1)
    );
    // A local hit.
    cache.get_or_load(&1, source.load("one")).await.unwrap();
    assert_eq!(requests(&capture, "local", "hit"), 1);
    // An absence, loaded.
    cache
        .get_or_load(&2, async { Ok::<Option<String>, std::io::Error>(None) })
        .await
        .unwrap();
    let loads =
        |outcome| capture.counter(CACHE_LOADS.name, &[("cache", "m"), ("outcome", outcome)]);
    assert_eq!((loads("loaded"), loads("none")), (1, 1));
    assert_eq!(
        capture
            .histogram(CACHE_LOAD_DURATION.name, &[("cache", "m")])
            .len(),
        2
    );
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "m")]),
        Some(2.0)
    );
    // A remote hit: another process's view, without the local entry.
    let redis = connect(&server).await;
    let other: Cache<u64, String> =
        capture.run(|| Cache::builder("m").redis(redis).build().unwrap());
    common::eventually("the load reached Redis", async || {
        other.get(&1).await.unwrap().is_some()
    })
    .await;
    assert!(requests(&capture, "remote", "hit") >= 1);
    let gets = capture.histogram(
        CACHE_REMOTE_DURATION.name,
        &[("cache", "m"), ("operation", "get")],
    );
    let sets = capture.histogram(
        CACHE_REMOTE_DURATION.name,
        &[("cache", "m"), ("operation", "set")],
    );
    assert!(
        gets.len() >= 3 && sets.len() >= 2,
        "get {}, set {}",
        gets.len(),
        sets.len()
    );
    cache.invalidate(&1).await.unwrap();
    assert_eq!(
        capture.gauge(CACHE_LOCAL_ENTRIES.name, &[("cache", "m")]),
        Some(1.0)
    );
    assert_eq!(
        capture
            .histogram(
                CACHE_REMOTE_DURATION.name,
                &[("cache", "m"), ("operation", "del")]
            )
            .len(),
        1
    );
}

#[tokio::test]
async fn a_remote_failure_is_a_remote_error() {
    let mut server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("m")
            .redis(redis)
            .remote_timeout(Duration::from_millis(50))
            .build()
            .unwrap()
    });
    server.kill().unwrap();
    let source = Source::default();
    assert!(
        cache
            .get_or_load(&1, source.load("v"))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(requests(&capture, "remote", "error"), 1);
    assert_eq!(requests(&capture, "remote", "miss"), 0);
}
