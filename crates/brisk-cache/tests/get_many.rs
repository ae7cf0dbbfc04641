//! `get_or_load_many`: one MGET, one batch load of the misses, results per key in order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_cache::{Cache, Error, LocalTier};
use brisk_testkit::RedisServer;
use common::{connect, eventually, every_shape, raw_get, redis};

/// A batch loader that records the keys of each call and finds `value(k)` for keys in `has`.
#[derive(Clone, Default)]
struct Batches {
    calls: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Batches {
    fn load(
        &self,
        has: impl Fn(u64) -> bool + Send + 'static,
    ) -> impl FnOnce(Vec<u64>) -> std::future::Ready<Result<HashMap<u64, String>, std::io::Error>>
    + Send
    + 'static {
        let calls = Arc::clone(&self.calls);
        move |keys: Vec<u64>| {
            calls.lock().unwrap().push(keys.clone());
            std::future::ready(Ok(keys
                .into_iter()
                .filter(|&k| has(k))
                .map(|k| (k, format!("v{k}")))
                .collect()))
        }
    }

    fn calls(&self) -> Vec<Vec<u64>> {
        self.calls.lock().unwrap().clone()
    }
}

fn values(results: Vec<Result<Option<String>, Error>>) -> Vec<Option<String>> {
    results.into_iter().map(Result::unwrap).collect()
}

/// How many times Redis ran `command` since the last `CONFIG RESETSTAT`.
fn calls_of(server: &RedisServer, command: &str) -> u64 {
    let stats = server.command(&["INFO", "commandstats"]).unwrap();
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test]
async fn a_hundred_keys_half_cached_take_one_read_and_one_load_of_the_misses() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("many")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    for k in (0..100).step_by(2) {
        cache.set(&k, format!("v{k}")).await.unwrap();
    }
    // Loads the scripts, so that what follows counts only the commands of one call.
    let warm = Batches::default();
    cache.get_or_load_many(&[1_000], warm.load(|_| true)).await;
    eventually("the warm-up landed", async || {
        server
            .command(&["EXISTS", "{brisk:many:1:i:1000}"])
            .unwrap()
            == "1"
    })
    .await;
    server.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let batches = Batches::default();
    let keys: Vec<u64> = (0..100).collect();
    let got = values(cache.get_or_load_many(&keys, batches.load(|_| true)).await);
    let expected: Vec<Option<String>> = keys.iter().map(|k| Some(format!("v{k}"))).collect();
    assert_eq!(got, expected, "every key, in order");
    let odd: Vec<u64> = (1..100).step_by(2).collect();
    assert_eq!(batches.calls(), [odd], "one load, of the 50 misses");
    eventually("the loaded values reached Redis", async || {
        server.command(&["EXISTS", "{brisk:many:1:i:99}"]).unwrap() == "1"
    })
    .await;
    // Two round trips: one script reads the 100 keys and leases the 50 missing, one stores the
    // 50 loaded, each fenced by its lease. (Redis counts the commands a script runs too.)
    assert_eq!(calls_of(&server, "evalsha"), 2, "one read, one write");
    // Inside the scripts: one MGET of the entries, one of the 50 leases before the writes; and
    // the cache's `clear` time, read with the first hit and known for a second after.
    assert_eq!(
        calls_of(&server, "mget"),
        3,
        "entries, leases, the clear time"
    );
    assert_eq!(calls_of(&server, "get"), 0);
    assert_eq!(
        calls_of(&server, "set"),
        100,
        "50 leases taken, 50 values stored"
    );
    assert_eq!(
        calls_of(&server, "del"),
        1,
        "the 50 leases ended by one DEL"
    );
    let again = Batches::default();
    assert_eq!(
        values(cache.get_or_load_many(&keys, again.load(|_| true)).await),
        expected
    );
    assert!(again.calls().is_empty(), "all hits now");
}

#[tokio::test]
async fn every_shape_answers_in_order_caches_absences_and_loads_each_key_once() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        cache.set(&2, "two".into()).await.unwrap();
        let batches = Batches::default();
        // Duplicates, a cached key, a key the loader finds and one it does not.
        let keys = [3, 2, 5, 3, 2];
        let got = values(
            cache
                .get_or_load_many(&keys, batches.load(|k| k == 3))
                .await,
        );
        assert_eq!(
            got,
            [
                Some("v3".into()),
                Some("two".into()),
                None,
                Some("v3".into()),
                Some("two".into())
            ],
            "{shape}"
        );
        assert_eq!(batches.calls(), [vec![3, 5]], "{shape}: each miss once");
        // The absence of 5 is cached (negative TTL): nothing to load the second time.
        let again = Batches::default();
        eventually("the batch landed", async || {
            cache.get(&3).await.unwrap().is_some()
        })
        .await;
        let got = values(cache.get_or_load_many(&[5, 3], again.load(|_| true)).await);
        assert_eq!(got, [None, Some("v3".into())], "{shape}");
        assert!(again.calls().is_empty(), "{shape}: {:?}", again.calls());
        // No keys: no load.
        let none = Batches::default();
        assert!(
            cache
                .get_or_load_many(&[], none.load(|_| true))
                .await
                .is_empty()
        );
        assert!(none.calls().is_empty());
    }
}

#[tokio::test]
async fn a_failing_or_panicking_batch_fails_only_the_missing_keys() {
    let server = redis();
    for (shape, cache) in every_shape(&server, |b| b).await {
        cache.set(&1, "one".into()).await.unwrap();
        let failed = cache
            .get_or_load_many(&[1, 2], |_keys: Vec<u64>| async {
                Err::<HashMap<u64, String>, _>(common::io_error("db down"))
            })
            .await;
        assert_eq!(
            failed[0].as_ref().unwrap().as_deref(),
            Some("one"),
            "{shape}"
        );
        assert!(
            matches!(failed[1], Err(Error::Load(_))),
            "{shape}: {:?}",
            failed[1]
        );
        let panicked = cache
            .get_or_load_many(&[2, 1], |_keys: Vec<u64>| async {
                panic!("in the batch");
                #[allow(unreachable_code)]
                Ok::<HashMap<u64, String>, std::io::Error>(HashMap::new())
            })
            .await;
        assert!(
            matches!(&panicked[0], Err(Error::Panicked { message }) if message.contains("in the batch")),
            "{shape}"
        );
        assert!(panicked[1].is_ok(), "{shape}");
        let built_panicking = cache
            .get_or_load_many(&[2], |_keys: Vec<u64>| -> std::future::Ready<Result<HashMap<u64, String>, std::io::Error>> {
                panic!("building the batch")
            })
            .await;
        assert!(
            matches!(&built_panicking[0], Err(Error::Panicked { .. })),
            "{shape}"
        );
        // The key can be loaded afterwards.
        let batches = Batches::default();
        assert_eq!(
            values(cache.get_or_load_many(&[2], batches.load(|_| true)).await),
            [Some("v2".into())]
        );
    }
}

/// A single-key read of a key the batch is loading joins the batch's load.
#[tokio::test]
async fn a_single_read_joins_a_batch_load_in_progress() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("join")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .build()
        .unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let batch = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load_many(&[1, 2], |keys: Vec<u64>| async move {
                    let _ = released.await;
                    Ok::<_, std::io::Error>(
                        keys.into_iter()
                            .map(|k| (k, format!("batch{k}")))
                            .collect::<HashMap<_, _>>(),
                    )
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let single = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(&2, async {
                    Ok::<_, std::io::Error>(Some("single".to_owned()))
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    release.send(()).unwrap();
    assert_eq!(single.await.unwrap().unwrap().as_deref(), Some("batch2"));
    let got = values(batch.await.unwrap());
    assert_eq!(got, [Some("batch1".into()), Some("batch2".into())]);
}

/// A batch load that began before another instance invalidated one of its keys stores the
/// others, not that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_batch_load_fences_out_that_key() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let instance = async || -> Cache<u64, String> {
        Cache::builder("fence")
            .redis(connect(&server).await)
            .build()
            .unwrap()
    };
    let (a, b) = (instance().await, instance().await);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let batch = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load_many(&[1, 2], |keys: Vec<u64>| async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(
                    keys.into_iter()
                        .map(|k| (k, format!("old{k}")))
                        .collect::<HashMap<_, _>>(),
                )
            })
            .await
        }
    });
    eventually("the batch holds its leases", async || {
        raw_get(&server, "{brisk:fence:1:i:2}:lease")
            .await
            .is_some()
    })
    .await;
    b.invalidate(&2).await.unwrap();
    release.send(()).unwrap();
    assert_eq!(
        values(batch.await.unwrap()),
        [Some("old1".into()), Some("old2".into())]
    );
    eventually("key 1 stored", async || {
        raw_get(&server, "{brisk:fence:1:i:1}").await.is_some()
    })
    .await;
    assert_eq!(
        raw_get(&server, "{brisk:fence:1:i:2}").await,
        None,
        "key 2 fenced out"
    );
}

/// On the 3-master cluster: keys over every slot range, read by MGETs split per slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_many_keys_are_read_and_loaded_per_slot() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let cache: Cache<u64, String> = Cache::builder("cm")
        .redis(client.get_async_connection().await.unwrap())
        .build()
        .unwrap();
    for k in (0..60).step_by(3) {
        cache.set(&k, format!("v{k}")).await.unwrap();
    }
    let batches = Batches::default();
    let keys: Vec<u64> = (0..60).collect();
    let got = values(cache.get_or_load_many(&keys, batches.load(|_| true)).await);
    assert_eq!(
        got,
        keys.iter()
            .map(|k| Some(format!("v{k}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(batches.calls().len(), 1);
    assert_eq!(batches.calls()[0].len(), 40, "the 40 not set");
    let again = Batches::default();
    eventually("the loaded keys reached the cluster", async || {
        values(cache.get_or_load_many(&keys, again.load(|_| true)).await) == got
            && again.calls().is_empty()
    })
    .await;
}
