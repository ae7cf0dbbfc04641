//! Redis killed, paused, full or restarted: requests get slower, never failed.

mod common;

use std::time::Duration;

use brisk_cache::{Cache, Error, LocalTier};
use brisk_metrics::catalog::{CACHE_BREAKER_STATE, CACHE_REQUESTS};
use brisk_metrics::testing::Capture;
use common::{Source, connect, eventually, raw_get, redis};
use tokio::time::Instant;

const REMOTE_TIMEOUT: Duration = Duration::from_millis(100);
/// What a loaded 2-core machine may add to a bound (scheduling, not the cache's logic).
const SLACK: Duration = Duration::from_millis(400);

/// A cache on `server` with the tests' remote timeout, built inside a fresh capture.
async fn observed(server: &brisk_testkit::RedisServer) -> (Capture, Cache<u64, String>) {
    let capture = Capture::new();
    let redis = connect(server).await;
    let cache = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .remote_timeout(REMOTE_TIMEOUT)
            .build()
            .unwrap()
    });
    (capture, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_two_thousand_calls_fails_none_and_is_used_again_after_restart() {
    let mut server = redis();
    let (capture, cache) = observed(&server).await;
    let source = Source::default();
    let (mut errors, mut worst) = (0, Duration::ZERO);
    for round in 0..250_u64 {
        if round == 60 {
            server.kill().unwrap();
        }
        let calls = (0..8).map(|i| {
            let (cache, load) = (cache.clone(), source.load("v"));
            async move {
                let started = Instant::now();
                let outcome = cache.get_or_load(&((round * 8 + i) % 300), load).await;
                (started.elapsed(), outcome)
            }
        });
        for (took, outcome) in futures_util::future::join_all(calls).await {
            errors += usize::from(outcome.is_err());
            worst = worst.max(took);
        }
    }
    assert_eq!(errors, 0, "no call failed");
    assert!(
        worst < REMOTE_TIMEOUT + SLACK,
        "the slowest call took {worst:?}"
    );
    let remote_errors = capture.counter(
        CACHE_REQUESTS.name,
        &[("cache", "t"), ("tier", "remote"), ("outcome", "error")],
    );
    assert!(remote_errors > 0, "Redis was down");

    server.restart().unwrap();
    let restarted = Instant::now();
    eventually("the remote tier is used again", async || {
        let _ = cache.set(&1, "back".into()).await;
        raw_get(&server, "{brisk:t:1:i:1}").await.is_some()
    })
    .await;
    let back_after = restarted.elapsed();
    assert!(
        back_after < Duration::from_secs(1),
        "Redis used again after {back_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_opens_the_breaker_and_a_probe_closes_it_after_resume() {
    let mut server = redis();
    let (capture, cache) = observed(&server).await;
    let source = Source::default();
    cache.set(&0, "warm".into()).await.unwrap();
    server.pause().unwrap();
    let mut took = Vec::new();
    for key in 1..=20 {
        let started = Instant::now();
        let value = cache
            .get_or_load(&key, source.load("loaded"))
            .await
            .unwrap();
        assert_eq!(value.as_deref(), Some("loaded"));
        took.push(started.elapsed());
    }
    assert!(
        took.iter().all(|t| *t < REMOTE_TIMEOUT + SLACK),
        "bounded by the remote timeout: {took:?}"
    );
    assert_eq!(
        capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "t")]),
        Some(2.0),
        "open"
    );
    // Five reads timed out; once open, the breaker skips Redis: the rest do not wait for it.
    let skipped = took[5..]
        .iter()
        .filter(|t| **t < REMOTE_TIMEOUT / 2)
        .count();
    assert!(
        skipped >= 10,
        "calls skipping Redis: {skipped} of 15: {took:?}"
    );

    server.resume().unwrap();
    let hits = || {
        capture.counter(
            CACHE_REQUESTS.name,
            &[("cache", "t"), ("tier", "remote"), ("outcome", "hit")],
        )
    };
    let before = hits();
    eventually("a probe closed the breaker", async || {
        let _ = cache.get_or_load(&0, source.load("loaded")).await;
        capture.gauge(CACHE_BREAKER_STATE.name, &[("cache", "t")]) == Some(0.0)
    })
    .await;
    eventually("Redis serves again", async || {
        let _ = cache.get(&0).await;
        hits() > before
    })
    .await;
}

#[tokio::test]
async fn a_cache_write_that_fails_removes_the_key_so_no_stale_value_survives() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    // Redis refuses writes (out of memory, noeviction) but still deletes.
    server
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .unwrap();
    cache
        .write_through(&1, "new".into(), async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    assert_eq!(
        raw_get(&server, "{brisk:t:1:i:1}").await,
        None,
        "removed, not left old"
    );
    server
        .command(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None, "no stale read");
}

#[tokio::test]
async fn a_cache_write_and_removal_that_both_fail_are_reported() {
    let mut server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    server.kill().unwrap();
    let err = cache
        .write_through(&1, "new".into(), async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Remote(_)), "{err}");
    assert!(err.to_string().contains("may serve an old value"), "{err}");
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("new"),
        "this process has the new value"
    );
}

#[tokio::test]
async fn a_write_through_dropped_midway_removes_the_key_everywhere() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(20),
        cache.write_through(
            &1,
            "new".into(),
            std::future::pending::<Result<(), std::io::Error>>(),
        ),
    )
    .await;
    assert!(cut.is_err());
    eventually("removed from Redis", async || {
        raw_get(&server, "{brisk:t:1:i:1}").await.is_none()
    })
    .await;
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "neither old nor new is served"
    );
}

#[tokio::test]
async fn an_invalidation_during_a_load_wins() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(10))
        .build()
        .unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let loading = tokio::spawn({
        let (cache, gate) = (cache.clone(), gate.clone());
        async move {
            cache
                .get_or_load(&1, async move {
                    let _open = gate.acquire().await;
                    Ok::<_, std::io::Error>(Some("read before the write".to_owned()))
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    cache.set(&1, "written".into()).await.unwrap();
    gate.add_permits(1);
    assert_eq!(
        loading.await.unwrap().unwrap().as_deref(),
        Some("read before the write")
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("written"),
        "the load did not overwrite the write"
    );
    let raw = raw_get(&server, "{brisk:t:1:i:1}").await.unwrap();
    assert!(String::from_utf8_lossy(&raw).contains("written"));
}
