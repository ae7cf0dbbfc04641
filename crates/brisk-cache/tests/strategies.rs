//! Each strategy on every shape of cache: in-memory or Redis remote tier, with and without a
//! local tier.

mod common;

use std::time::Duration;

use brisk_cache::{Cache, Error};
use common::{Source, every_shape, io_error, redis};

#[tokio::test]
async fn cache_aside_loads_once_then_hits() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        let source = Source::default();
        let first = cache.get_or_load(&1, source.load("one")).await.unwrap();
        assert_eq!(first.as_deref(), Some("one"), "{shape}");
        // The remote write lands on the load's task; the value is served meanwhile either way.
        for _ in 0..3 {
            let hit = cache.get_or_load(&1, source.load("other")).await.unwrap();
            assert_eq!(hit.as_deref(), Some("one"), "{shape}");
        }
        assert_eq!(source.count(), 1, "{shape}: loaded once");
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("one"),
            "{shape}"
        );
        assert_eq!(
            cache.get(&2).await.unwrap(),
            None,
            "{shape}: get loads nothing"
        );
    }
}

#[tokio::test]
async fn a_clone_shares_the_cache() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        let clone = cache.clone();
        cache.set(&5, "five".into()).await.unwrap();
        assert_eq!(
            clone.get(&5).await.unwrap().as_deref(),
            Some("five"),
            "{shape}"
        );
    }
}

#[tokio::test]
async fn read_through_uses_the_registered_loader() {
    let server = redis();
    let source = Source::default();
    let configure = |b: common::Builder| {
        let source = source.clone();
        b.loader(move |key: u64| source.load(&format!("user {key}")))
    };
    for (shape, cache) in every_shape(&server, configure).await {
        let before = source.count();
        assert_eq!(
            cache.get(&7).await.unwrap().as_deref(),
            Some("user 7"),
            "{shape}"
        );
        assert_eq!(
            cache.get(&7).await.unwrap().as_deref(),
            Some("user 7"),
            "{shape}"
        );
        assert_eq!(source.count() - before, 1, "{shape}");
    }
}

#[tokio::test]
async fn set_get_and_invalidate() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        cache.set(&1, "a".into()).await.unwrap();
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("a"),
            "{shape}"
        );
        cache.set(&1, "b".into()).await.unwrap();
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("b"),
            "{shape}"
        );
        cache.invalidate(&1).await.unwrap();
        assert_eq!(cache.get(&1).await.unwrap(), None, "{shape}");
        let source = Source::default();
        let reloaded = cache.get_or_load(&1, source.load("c")).await.unwrap();
        assert_eq!(reloaded.as_deref(), Some("c"), "{shape}");
        assert_eq!(source.count(), 1, "{shape}");
    }
}

#[tokio::test]
async fn write_through_writes_the_source_then_the_cache() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        cache.set(&1, "old".into()).await.unwrap();
        let written = std::sync::Mutex::new(None);
        cache
            .write_through(&1, "new".into(), async {
                *written.lock().unwrap() = Some("new");
                Ok::<_, std::io::Error>(())
            })
            .await
            .unwrap();
        assert_eq!(*written.lock().unwrap(), Some("new"), "{shape}");
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("new"),
            "{shape}"
        );
    }
}

#[tokio::test]
async fn a_failed_write_leaves_the_cache_as_it_was() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        cache.set(&1, "old".into()).await.unwrap();
        let err = cache
            .write_through(&1, "new".into(), async {
                Err::<(), _>(io_error("disk full"))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Write(_)), "{shape}: {err}");
        assert!(err.to_string().contains("disk full"), "{shape}: {err}");
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("old"),
            "{shape}"
        );
    }
}

#[tokio::test]
async fn none_is_cached_for_the_negative_ttl() {
    let server = redis();
    let configure = |b: common::Builder| b.negative_ttl(Duration::from_millis(300));
    for (shape, cache) in every_shape(&server, configure).await {
        let source = Source::default();
        let loads = source.loads.clone();
        let none = || {
            let loads = loads.clone();
            async move {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<Option<String>, std::io::Error>(None)
            }
        };
        assert_eq!(
            cache.get_or_load(&9, none()).await.unwrap(),
            None,
            "{shape}"
        );
        common::eventually("the absence reached the remote tier", async || {
            cache.get_or_load(&9, none()).await.unwrap().is_none() && source.count() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            cache
                .get_or_load(&9, source.load("now"))
                .await
                .unwrap()
                .as_deref(),
            Some("now"),
            "{shape}"
        );
        assert_eq!(
            source.count(),
            2,
            "{shape}: reloaded after the negative TTL"
        );
    }
}

#[tokio::test]
async fn a_zero_negative_ttl_caches_no_absence() {
    let cache: Cache<u64, String> = Cache::builder("t")
        .negative_ttl(Duration::ZERO)
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
    assert_eq!(
        cache
            .get_or_load(&1, source.load("x"))
            .await
            .unwrap()
            .as_deref(),
        Some("x")
    );
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let server = redis();
    let configure = |b: common::Builder| b.ttl(Duration::from_millis(200));
    for (shape, cache) in every_shape(&server, configure).await {
        cache.set(&1, "a".into()).await.unwrap();
        assert!(cache.get(&1).await.unwrap().is_some(), "{shape}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(cache.get(&1).await.unwrap(), None, "{shape}");
    }
}

#[tokio::test]
async fn the_keys_in_redis_are_namespaced_by_cache() {
    let server = redis();
    let redis = common::connect(&server).await;
    let a: Cache<u64, String> = Cache::builder("a").redis(redis.clone()).build().unwrap();
    let b: Cache<u64, String> = Cache::builder("b").redis(redis).build().unwrap();
    a.set(&1, "from a".into()).await.unwrap();
    assert_eq!(b.get(&1).await.unwrap(), None);
    assert!(common::raw_get(&server, "{brisk:a:1:i:1}").await.is_some());
    b.set(&1, "from b".into()).await.unwrap();
    assert_eq!(a.get(&1).await.unwrap().as_deref(), Some("from a"));
}
