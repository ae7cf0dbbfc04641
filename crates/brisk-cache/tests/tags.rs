//! Tags and clear, across instances, on private servers and the 3-master cluster.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use brisk_cache::{Cache, CacheBuilder, Error, Invalidation, LocalTier};
use brisk_pool::redis_source::{Multiplexed, RedisSource};
use brisk_testkit::RedisServer;
use common::{connect, eventually, redis};

type Posts = Cache<u64, String>;

/// Keys below 100 are by author 42, from 100 to 199 by author 7, the rest untagged.
fn tagged(builder: CacheBuilder<u64, String>) -> CacheBuilder<u64, String> {
    builder.tags(|id: &u64, _: Option<&String>| match id {
        0..100 => vec!["author:42".to_owned(), "kind:post".to_owned()],
        100..200 => vec!["author:7".to_owned()],
        _ => Vec::new(),
    })
}

async fn instance(
    source: impl RedisSource,
    invalidation: Option<Invalidation>,
    local: bool,
) -> Posts {
    let mut builder = tagged(Cache::builder("posts")).redis(source);
    if local {
        builder = builder.local(LocalTier::entries(1_000));
    }
    if let Some(invalidation) = invalidation {
        let cache = builder.invalidation(invalidation).build().unwrap();
        eventually("listening", async || cache.is_listening()).await;
        return cache;
    }
    builder.build().unwrap()
}

fn backplane(server: &RedisServer) -> Option<Invalidation> {
    Some(Invalidation::backplane(Multiplexed::builder(&server.url())))
}

async fn present(cache: &Posts, keys: &[u64]) -> Vec<bool> {
    let mut out = Vec::new();
    for key in keys {
        out.push(cache.get(key).await.unwrap().is_some());
    }
    out
}

const KEYS: [u64; 6] = [1, 2, 3, 101, 102, 300];

/// Tag three entries, invalidate the tag from another instance: all three miss, the others
/// stay; then `clear` and everything misses. Both instances keep local tiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidated_on_one_instance_misses_everywhere_and_clear_misses_all() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(connect(&server).await, backplane(&server), true).await;
    let b = instance(connect(&server).await, backplane(&server), true).await;
    for key in KEYS {
        a.set(&key, format!("post {key}")).await.unwrap();
    }
    // b reads them all, into its local tier.
    assert_eq!(present(&b, &KEYS).await, [true; 6]);

    a.invalidate_tag("author:42").await.unwrap();
    let expected = [false, false, false, true, true, true];
    assert_eq!(
        present(&a, &KEYS).await,
        expected,
        "on the invalidating instance"
    );
    eventually("b misses the tag's entries", async || {
        present(&b, &KEYS).await == expected
    })
    .await;

    // Written again after the invalidation: hits.
    a.set(&1, "post 1, again".to_owned()).await.unwrap();
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("post 1, again"));

    b.clear().await.unwrap();
    assert_eq!(present(&b, &KEYS).await, [false; 6]);
    eventually("a misses everything", async || {
        present(&a, &KEYS).await == [false; 6]
    })
    .await;
}

/// Without an invalidation connection, an instance that reads a tagged entry from Redis learns
/// of the tag's invalidation from Redis: at once if it never knew the tag, within a second if
/// it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_invalidation_other_instances_miss_within_a_second() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(connect(&server).await, None, false).await;
    let b = instance(connect(&server).await, None, false).await;
    for key in KEYS {
        a.set(&key, format!("post {key}")).await.unwrap();
    }
    assert_eq!(present(&b, &KEYS).await, [true; 6]);
    a.invalidate_tag("author:7").await.unwrap();
    let fresh = instance(connect(&server).await, None, false).await;
    let expected = [true, true, true, false, false, true];
    assert_eq!(
        present(&fresh, &KEYS).await,
        expected,
        "a new instance, at once"
    );
    let started = std::time::Instant::now();
    eventually("b misses within a second", async || {
        present(&b, &KEYS).await == expected
    })
    .await;
    assert!(started.elapsed() < std::time::Duration::from_millis(1_500));
}

/// A load that was under way when its tag was invalidated stores a value that is a miss: it
/// counts as made when it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_under_way_during_a_tag_invalidation_stores_a_miss() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(connect(&server).await, backplane(&server), true).await;
    let b = instance(connect(&server).await, backplane(&server), true).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&5, async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(Some("read before".to_owned()))
            })
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    b.invalidate_tag("author:42").await.unwrap();
    release.send(()).unwrap();
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("read before"));
    eventually("stored", async || {
        common::raw_get(&server, "{brisk:posts:1:i:5}")
            .await
            .is_some()
    })
    .await;
    for cache in [&a, &b] {
        assert_eq!(cache.get(&5).await.unwrap(), None);
    }
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    let fresh = b
        .get_or_load(&5, async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some("read after".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(fresh.as_deref(), Some("read after"));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

/// Absences are tagged too (the function sees `None`), and batches honour tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absences_and_batches_honour_tags() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cache = instance(connect(&server).await, None, false).await;
    let keys: Vec<u64> = vec![1, 2, 101, 300];
    let batch = async |keys: Vec<u64>| {
        Ok::<_, std::io::Error>(
            keys.into_iter()
                .filter(|k| *k != 2)
                .map(|k| (k, format!("post {k}")))
                .collect::<std::collections::HashMap<_, _>>(),
        )
    };
    let first = cache.get_or_load_many(&keys, batch).await;
    assert_eq!(first[1].as_ref().unwrap(), &None, "2 is absent");
    eventually("stored", async || {
        common::raw_get(&server, "{brisk:posts:1:i:300}")
            .await
            .is_some()
            && common::raw_get(&server, "{brisk:posts:1:i:2}")
                .await
                .is_some()
    })
    .await;
    cache.invalidate_tag("author:42").await.unwrap();
    let loaded = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&loaded);
    let again = cache
        .get_or_load_many(&keys, async move |keys: Vec<u64>| {
            seen.lock().unwrap().extend(keys.iter().copied());
            Ok::<_, std::io::Error>(
                keys.into_iter()
                    .map(|k| (k, format!("new {k}")))
                    .collect::<std::collections::HashMap<_, _>>(),
            )
        })
        .await;
    let mut reloaded = loaded.lock().unwrap().clone();
    reloaded.sort_unstable();
    assert_eq!(
        reloaded,
        [1, 2],
        "the tag's entries, the absence among them"
    );
    assert_eq!(again[1].as_ref().unwrap().as_deref(), Some("new 2"));
    assert_eq!(again[2].as_ref().unwrap().as_deref(), Some("post 101"));
}

/// The tag function is user code: a panic, or a tag refused, keeps the entry out; a set says
/// so, a load still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_function_that_panics_or_gives_bad_tags_stores_nothing() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cache: Posts = Cache::builder("posts")
        .redis(connect(&server).await)
        .tags(|id: &u64, _: Option<&String>| match id {
            1 => panic!("the tag function panicked"),
            2 => vec![String::new()],
            3 => vec!["x".repeat(257)],
            4 => vec!["t".to_owned(); 33],
            _ => vec!["ok".to_owned()],
        })
        .build()
        .unwrap();
    for key in 1..=4 {
        let refused = cache.set(&key, "v".to_owned()).await;
        assert!(matches!(refused, Err(Error::Tag(_))), "{key}: {refused:?}");
        let loaded = cache
            .get_or_load(&key, async {
                Ok::<_, std::io::Error>(Some("loaded".to_owned()))
            })
            .await
            .unwrap();
        assert_eq!(loaded.as_deref(), Some("loaded"));
        let rkey = format!("{{brisk:posts:1:i:{key}}}");
        assert_eq!(common::raw_get(&server, &rkey).await, None, "{key}");
    }
    cache.set(&5, "v".to_owned()).await.unwrap();
    assert!(cache.get(&5).await.unwrap().is_some());
    for bad in ["", &"x".repeat(257)] {
        assert!(matches!(
            cache.invalidate_tag(bad).await,
            Err(Error::Tag(_))
        ));
    }
}

/// Tracking sees the tag's time change in Redis: another instance's `invalidate_tag` empties
/// this one's local tier though nothing was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_sees_another_instances_tag_invalidation() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(connect(&server).await, None, false).await;
    let tracking = Some(Invalidation::tracking(Multiplexed::builder(&server.url())));
    let b = instance(connect(&server).await, tracking, true).await;
    for key in KEYS {
        a.set(&key, format!("post {key}")).await.unwrap();
    }
    assert_eq!(present(&b, &KEYS).await, [true; 6]);
    a.invalidate_tag("author:42").await.unwrap();
    eventually("b misses the tag's entries", async || {
        present(&b, &KEYS).await == [false, false, false, true, true, true]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_tags_and_clear_reach_every_instance() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let urls = cluster.urls();
    let on_node = |node: usize| Some(Invalidation::backplane(Multiplexed::builder(&urls[node])));
    let a = instance(
        client.get_async_connection().await.unwrap(),
        on_node(0),
        true,
    )
    .await;
    let b = instance(
        client.get_async_connection().await.unwrap(),
        on_node(1),
        true,
    )
    .await;
    let keys: Vec<u64> = (0..10).chain(100..110).chain(300..310).collect();
    for key in &keys {
        a.set(key, format!("post {key}")).await.unwrap();
    }
    let all = present(&b, &keys).await;
    assert!(all.iter().all(|p| *p));
    a.invalidate_tag("kind:post").await.unwrap();
    let expected: Vec<bool> = keys.iter().map(|k| *k >= 100).collect();
    eventually("b misses the tag's entries", async || {
        present(&b, &keys).await == expected
    })
    .await;
    b.clear().await.unwrap();
    eventually("a misses everything", async || {
        present(&a, &keys).await.iter().all(|p| !p)
    })
    .await;
}

/// In memory (no Redis) the times are all in process: every tag invalidated stays so.
#[tokio::test]
async fn in_memory_every_invalidated_tag_stays_invalidated() {
    let cache = tagged(Cache::builder("posts"))
        .local(LocalTier::entries(100))
        .build()
        .unwrap();
    for key in KEYS {
        cache.set(&key, format!("post {key}")).await.unwrap();
    }
    cache.invalidate_tag("author:42").await.unwrap();
    cache.invalidate_tag("author:7").await.unwrap();
    assert_eq!(
        present(&cache, &KEYS).await,
        [false, false, false, false, false, true]
    );
    cache.clear().await.unwrap();
    assert_eq!(present(&cache, &KEYS).await, [false; 6]);
}
