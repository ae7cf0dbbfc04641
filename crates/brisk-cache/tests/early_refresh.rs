//! Early refresh (`XFetch`) under paused time: a hot key is reloaded before it expires, by one
//! background load, and no caller waits for it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_cache::{BuildError, Cache, LocalTier};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);
const LOAD: Duration = Duration::from_secs(1);

/// A loader taking one (paused) second, counting its runs and answering with the run number.
fn slow_load(
    loads: &Arc<AtomicUsize>,
) -> impl Future<Output = Result<Option<String>, std::io::Error>> + Send + use<> {
    let loads = Arc::clone(loads);
    async move {
        let run = loads.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(LOAD).await;
        Ok(Some(format!("v{run}")))
    }
}

/// Reads the key every 100 ms from its first load until just past its first expiry; returns
/// the values read.
async fn read_through_the_expiry(
    cache: &Cache<u64, String>,
    loads: &Arc<AtomicUsize>,
) -> Vec<String> {
    let first = cache
        .get_or_load(&1, slow_load(loads))
        .await
        .unwrap()
        .unwrap();
    let expiry = Instant::now() + TTL;
    let mut seen = vec![first];
    while Instant::now() < expiry + Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let value = cache
            .get_or_load(&1, slow_load(loads))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a caller waited for the refresh"
        );
        seen.push(value);
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn a_hot_key_is_refreshed_before_it_expires_by_one_background_load() {
    fastrand::seed(42);
    for local in [true, false] {
        let mut builder = Cache::builder("early").ttl(TTL).early_refresh(1.0);
        if local {
            builder = builder.local(LocalTier::entries(100));
        }
        let cache: Cache<u64, String> = builder.build().unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let seen = read_through_the_expiry(&cache, &loads).await;
        assert_eq!(
            loads.load(Ordering::SeqCst),
            2,
            "local {local}: the first load and one refresh"
        );
        assert_eq!(seen.first().map(String::as_str), Some("v1"));
        assert_eq!(
            seen.last().map(String::as_str),
            Some("v2"),
            "local {local}: refreshed in time"
        );
        // Never a miss: every read was v1 until the refresh landed, then v2.
        let switch = seen.iter().position(|v| v == "v2").unwrap();
        assert!(
            seen[..switch].iter().all(|v| v == "v1") && seen[switch..].iter().all(|v| v == "v2")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn without_early_refresh_the_key_is_loaded_at_its_expiry() {
    let cache: Cache<u64, String> = Cache::builder("late")
        .ttl(TTL)
        .local(LocalTier::entries(100))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    cache.get_or_load(&1, slow_load(&loads)).await.unwrap();
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    for _ in 0..100 {
        cache.get_or_load(&1, slow_load(&loads)).await.unwrap();
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "no load before the expiry");
    tokio::time::sleep(Duration::from_millis(2)).await;
    let started = Instant::now();
    cache.get_or_load(&1, slow_load(&loads)).await.unwrap();
    assert_eq!(
        started.elapsed(),
        LOAD,
        "past the expiry the caller waits for the load"
    );
}

#[test]
fn a_beta_that_is_not_a_positive_number_is_refused() {
    for beta in [0.0, -1.0, f64::NAN, f64::INFINITY, 101.0] {
        let built = Cache::<u64, String>::builder("b")
            .early_refresh(beta)
            .build();
        assert!(matches!(built, Err(BuildError::EarlyRefresh(_))), "{beta}");
    }
    assert!(
        Cache::<u64, String>::builder("b")
            .early_refresh(1.0)
            .build()
            .is_ok()
    );
}
