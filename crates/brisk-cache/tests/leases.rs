//! Leases across processes: several `Cache` instances on their own connections stand in for
//! several processes sharing one Redis.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brisk_cache::{Cache, LocalTier};
use brisk_testkit::RedisServer;
use common::{connect, eventually, raw_get, redis};

const KEY: &str = "{brisk:t:1:i:1}";
const LEASE: &str = "{brisk:t:1:i:1}:lease";

async fn instance(
    server: &RedisServer,
    configure: impl Fn(common::Builder) -> common::Builder,
) -> Cache<u64, String> {
    configure(Cache::builder("t"))
        .redis(connect(server).await)
        .local(LocalTier::entries(100))
        .build()
        .unwrap()
}

/// The stale-set race: a slow load starts, another instance invalidates the key, the load
/// finishes. Its value answers its own callers, but is stored nowhere: not in Redis, not in its
/// own local tier; the next read loads afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_began_before_an_invalidation_stores_nothing() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let (a, b) = (
        instance(&server, |b| b).await,
        instance(&server, |b| b).await,
    );
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&1, async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(Some("old".to_owned()))
            })
            .await
        }
    });
    eventually("the load holds the lease", async || {
        raw_get(&server, LEASE).await.is_some()
    })
    .await;
    b.invalidate(&1).await.unwrap();
    release.send(()).unwrap();
    assert_eq!(
        slow.await.unwrap().unwrap().as_deref(),
        Some("old"),
        "its own caller"
    );
    eventually("the fenced value left the local tier", async || {
        a.get(&1).await.unwrap().is_none()
    })
    .await;
    assert_eq!(raw_get(&server, KEY).await, None, "nothing stored in Redis");
    let fresh = a
        .get_or_load(&1, async {
            Ok::<_, std::io::Error>(Some("new".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(fresh.as_deref(), Some("new"));
    eventually("the other instance reads the new value", async || {
        b.get(&1).await.unwrap().as_deref() == Some("new")
    })
    .await;
}

/// A write (not only an invalidation) from another instance fences the load out too, and the
/// written value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_another_instance_wins_over_a_load_in_progress() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let (a, b) = (
        instance(&server, |b| b).await,
        instance(&server, |b| b).await,
    );
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&1, async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(Some("loaded".to_owned()))
            })
            .await
        }
    });
    eventually("the load holds the lease", async || {
        raw_get(&server, LEASE).await.is_some()
    })
    .await;
    b.set(&1, "written".to_owned()).await.unwrap();
    release.send(()).unwrap();
    slow.await.unwrap().unwrap();
    eventually("the load's value left a's local tier", async || {
        a.get(&1).await.unwrap().as_deref() == Some("written")
    })
    .await;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("written"));
}

/// Four instances, 250 concurrent misses of one key each: the loader runs once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_missing_one_key_load_it_once() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(instance(&server, |b| b).await);
    }
    let loads = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for cache in &instances {
        for _ in 0..250 {
            let (cache, loads) = (cache.clone(), Arc::clone(&loads));
            calls.spawn(async move {
                cache
                    .get_or_load(&1, async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>(Some("v".to_owned()))
                    })
                    .await
            });
        }
    }
    while let Some(value) = calls.join_next().await {
        assert_eq!(value.unwrap().unwrap().as_deref(), Some("v"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one load across the four");
}

/// The lease holder dies mid-load (its runtime is shut down, as a process would end): another
/// instance waits, then loads once the lease's TTL (hard timeout plus two remote timeouts)
/// has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_frees_the_key_after_the_lease_ttl() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let short = |b: common::Builder| {
        b.hard_timeout(Duration::from_millis(300))
            .remote_timeout(Duration::from_millis(50))
    };
    let url = server.url();
    // The holder, on a runtime of its own.
    let holder = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let redis = brisk_pool::redis_source::Multiplexed::builder(&url)
                .connect()
                .await
                .unwrap();
            let cache: Cache<u64, String> =
                short(Cache::builder("t")).redis(redis).build().unwrap();
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                cache.get_or_load(
                    &1,
                    std::future::pending::<Result<Option<String>, std::io::Error>>(),
                ),
            )
            .await;
        });
        drop(runtime); // the load, holding the lease, is dropped with it
    });
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    assert!(
        raw_get(&server, LEASE).await.is_some(),
        "the dead load's lease is left"
    );
    let other = instance(&server, short).await;
    let started = Instant::now();
    let loads = Arc::new(AtomicUsize::new(0));
    let value = other
        .get_or_load(&1, {
            let loads = Arc::clone(&loads);
            async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Some("after".to_owned()))
            }
        })
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("after"));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "waited {waited:?} for a lease of 400 ms taken ~100 ms before"
    );
}

/// A load that fails gives its lease back at once: an instance waiting on it loads without
/// waiting out the lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_lets_the_next_instance_in_at_once() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let (a, b) = (
        instance(&server, |b| b).await,
        instance(&server, |b| b).await,
    );
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let failing = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&1, async move {
                let _ = released.await;
                Err::<Option<String>, _>(common::io_error("down"))
            })
            .await
        }
    });
    eventually("the load holds the lease", async || {
        raw_get(&server, LEASE).await.is_some()
    })
    .await;
    let waiting = tokio::spawn({
        let b = b.clone();
        async move {
            b.get_or_load(&1, async { Ok::<_, std::io::Error>(Some("b".to_owned())) })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    release.send(()).unwrap();
    assert!(failing.await.unwrap().is_err());
    assert_eq!(waiting.await.unwrap().unwrap().as_deref(), Some("b"));
    // The lease TTL is 10.2 s by default; it took about one poll.
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// On a 3-master cluster: keys spread over every slot range, each with its lease in its slot.
/// Loads are fenced by another instance's invalidation, misses from two instances load once,
/// and the strategies work as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_leases_fence_and_share_loads() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let on_cluster = async || -> Cache<u64, String> {
        Cache::builder("c")
            .redis(client.get_async_connection().await.unwrap())
            .local(LocalTier::entries(100))
            .build()
            .unwrap()
    };
    let (a, b) = (on_cluster().await, on_cluster().await);
    let loads = Arc::new(AtomicUsize::new(0));
    for key in 0..20_u64 {
        // Fenced: a slow load on `a`, invalidated from `b`.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let slow = tokio::spawn({
            let a = a.clone();
            async move {
                a.get_or_load(&key, async move {
                    let _ = released.await;
                    Ok::<_, std::io::Error>(Some("old".to_owned()))
                })
                .await
            }
        });
        // Another instance's miss meanwhile waits on the lease rather than loading.
        let waiting = tokio::spawn({
            let (b, loads) = (b.clone(), Arc::clone(&loads));
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                b.get_or_load(&key, async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Some("b".to_owned()))
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.invalidate(&key).await.unwrap();
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("old"));
        // `b` waited on `a`'s lease; the invalidation ended it, so `b` loaded its own value
        // (and, its load having begun before its own invalidation, stored it nowhere either).
        assert_eq!(
            waiting.await.unwrap().unwrap().as_deref(),
            Some("b"),
            "key {key}"
        );
        eventually("the fenced value is nowhere", async || {
            a.get(&key).await.unwrap().is_none() && b.get(&key).await.unwrap().is_none()
        })
        .await;
    }
    assert_eq!(loads.load(Ordering::SeqCst), 20);
    a.set(&100, "set".to_owned()).await.unwrap();
    assert_eq!(b.get(&100).await.unwrap().as_deref(), Some("set"));
}
