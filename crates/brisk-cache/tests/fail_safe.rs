//! Stale values stand in for failed and slow loads; timeouts bound everything.

use std::time::Duration;

use brisk_cache::{Cache, Error};
use brisk_core::deadline;
use brisk_metrics::catalog::{CACHE_LOADS, CACHE_REQUESTS};
use brisk_metrics::testing::Capture;
use tokio::time::{Instant, advance, sleep};

async fn fail() -> Result<Option<String>, std::io::Error> {
    Err(std::io::Error::other("db down"))
}

fn slow(
    after: Duration,
    value: &str,
) -> impl Future<Output = Result<Option<String>, std::io::Error>> + Send + use<> {
    let value = value.to_owned();
    async move {
        sleep(after).await;
        Ok(Some(value))
    }
}

fn stale_cache(capture: &Capture) -> Cache<u64, String> {
    capture.run(|| {
        Cache::builder("t")
            .ttl(Duration::from_secs(1))
            .stale_for(Duration::from_secs(60))
            .soft_timeout(Duration::from_millis(100))
            .hard_timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    })
}

const STALE: [(&str, &str); 3] = [("cache", "t"), ("tier", "remote"), ("outcome", "stale")];

#[tokio::test(start_paused = true)]
async fn a_failed_load_serves_the_stale_value() {
    let capture = Capture::new();
    let cache = stale_cache(&capture);
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "stale values are not fresh"
    );
    assert_eq!(
        cache.get_or_load(&1, fail()).await.unwrap().as_deref(),
        Some("old")
    );
    assert_eq!(capture.counter(CACHE_REQUESTS.name, &STALE), 1);
    assert_eq!(
        capture.counter(CACHE_LOADS.name, &[("cache", "t"), ("outcome", "error")]),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_stale_value_the_error_is_returned() {
    let cache = stale_cache(&Capture::new());
    assert!(matches!(
        cache.get_or_load(&1, fail()).await,
        Err(Error::Load(_))
    ));
    cache.set(&2, "old".into()).await.unwrap();
    advance(Duration::from_secs(62)).await; // past the stale window as well
    assert!(matches!(
        cache.get_or_load(&2, fail()).await,
        Err(Error::Load(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn past_the_soft_timeout_the_stale_value_is_served_and_the_refresh_finishes() {
    let capture = Capture::new();
    let cache = stale_cache(&capture);
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let started = Instant::now();
    let served = cache
        .get_or_load(&1, slow(Duration::from_secs(2), "new"))
        .await
        .unwrap();
    assert_eq!(served.as_deref(), Some("old"));
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(100),
        "the soft timeout"
    );
    assert_eq!(capture.counter(CACHE_REQUESTS.name, &STALE), 1);
    sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("new"),
        "refreshed in the background"
    );
}

#[tokio::test(start_paused = true)]
async fn the_hard_timeout_bounds_a_load_without_a_stale_value() {
    let capture = Capture::new();
    let cache = stale_cache(&capture);
    let started = Instant::now();
    let err = cache
        .get_or_load(&1, slow(Duration::from_secs(3_600), "never"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LoadTimeout { after } if after == Duration::from_secs(5)),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(
        capture.counter(CACHE_LOADS.name, &[("cache", "t"), ("outcome", "timeout")]),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn the_hard_timeout_with_a_stale_value_serves_it() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .ttl(Duration::from_secs(1))
        .stale_for(Duration::from_secs(60))
        .hard_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let started = Instant::now();
    let served = cache
        .get_or_load(&1, slow(Duration::from_secs(3_600), "never"))
        .await
        .unwrap();
    assert_eq!(served.as_deref(), Some("old"));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "no soft timeout: waits the hard one"
    );
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_bounds_the_wait_and_the_load_goes_on() {
    let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
    let started = Instant::now();
    let outcome = deadline::scope(
        Instant::now() + Duration::from_millis(50),
        cache.get_or_load(&1, slow(Duration::from_secs(1), "v")),
    )
    .await;
    assert!(
        matches!(&outcome, Err(Error::Deadline(e)) if e.is_deadline()),
        "{outcome:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    sleep(Duration::from_secs(1)).await;
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_with_a_stale_value_serves_it() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .ttl(Duration::from_secs(1))
        .stale_for(Duration::from_secs(60))
        .build()
        .unwrap();
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let served = deadline::scope(
        Instant::now() + Duration::from_millis(50),
        cache.get_or_load(&1, slow(Duration::from_secs(1), "v")),
    )
    .await;
    assert_eq!(served.unwrap().as_deref(), Some("old"));
}

#[tokio::test(start_paused = true)]
async fn a_joiner_without_its_own_stale_value_gets_the_first_callers() {
    let cache = stale_cache(&Capture::new());
    cache.set(&1, "old".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let first = tokio::spawn({
        let (cache, gate) = (cache.clone(), gate.clone());
        async move {
            cache
                .get_or_load(&1, async move {
                    let _open = gate.acquire().await;
                    Err::<Option<String>, _>(std::io::Error::other("db down"))
                })
                .await
        }
    });
    sleep(Duration::from_millis(10)).await;
    // Joins the load in progress without reading Redis itself.
    let joiner = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load(&1, fail()).await }
    });
    sleep(Duration::from_millis(10)).await;
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(joiner.await.unwrap().unwrap().as_deref(), Some("old"));
}

#[tokio::test(start_paused = true)]
async fn a_local_entry_past_its_own_ttl_is_served_if_the_reload_fails() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .ttl(Duration::from_secs(10))
        .local(brisk_cache::LocalTier::entries(10).ttl(Duration::from_secs(1)))
        .build()
        .unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    advance(Duration::from_secs(2)).await;
    // The local tier asks the remote tier again, which still has it fresh.
    assert_eq!(
        cache.get_or_load(&1, fail()).await.unwrap().as_deref(),
        Some("v")
    );
}
