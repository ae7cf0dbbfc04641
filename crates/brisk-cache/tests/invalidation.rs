//! Local tiers kept coherent across instances: the backplane and Redis's tracking, on private
//! servers (and the 3-master cluster) that the tests kill and write behind the caches' backs.

mod common;

use std::time::Duration;

use brisk_cache::{BuildError, Cache, Invalidation, LocalTier};
use brisk_metrics::catalog::CACHE_INVALIDATIONS;
use brisk_metrics::testing::Capture;
use brisk_pool::redis_source::Multiplexed;
use brisk_testkit::RedisServer;
use common::{connect, eventually, raw, raw_set, reads, redis, text, within};

const KEY: &str = "{brisk:t:1:i:1}";

/// An instance of the cache `t` with a local tier that would keep entries a minute: only an
/// invalidation makes it let go sooner.
async fn instance(server: &RedisServer, invalidation: Option<Invalidation>) -> Cache<u64, String> {
    let builder = Cache::builder("t")
        .redis(connect(server).await)
        .local(LocalTier::entries(1_000));
    let listens = invalidation.is_some();
    let cache = match invalidation {
        Some(invalidation) => builder.invalidation(invalidation),
        None => builder,
    }
    .build()
    .unwrap();
    if listens {
        eventually("the invalidation connection is set up", async || {
            cache.is_listening()
        })
        .await;
    }
    cache
}

fn backplane(server: &RedisServer) -> Invalidation {
    Invalidation::backplane(Multiplexed::builder(&server.url()))
}

fn tracking(server: &RedisServer) -> Invalidation {
    Invalidation::tracking(Multiplexed::builder(&server.url()))
}

const SOON: Duration = Duration::from_millis(100);

/// `b` holds `value` for key 1 in its local tier, and Redis no longer does: what `b` answers
/// from then on shows whether its local entry is still there.
async fn held_locally_only(server: &RedisServer, b: &Cache<u64, String>, value: &str) {
    let owned = value.to_owned();
    let got = b
        .get_or_load(&1, async move { Ok::<_, std::io::Error>(Some(owned)) })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(value));
    // Written by the load's own task: wait for it, then remove it behind the cache's back
    // (DEL of a key no one tracks or publishes about here).
    eventually("the load stored its value", async || {
        common::raw_get(server, KEY).await.is_some()
    })
    .await;
    let _ = raw(server, &["DEL", KEY]).await;
    assert_eq!(
        b.get(&1).await.unwrap().as_deref(),
        Some(value),
        "served locally"
    );
}

/// Whether `b` answers key 1 without reading Redis, and what.
async fn served_locally(server: &RedisServer, b: &Cache<u64, String>) -> (bool, Option<String>) {
    let before = reads(server).await;
    let value = b.get(&1).await.unwrap();
    (reads(server).await == before, value)
}

/// With tracking every write to the key (this instance's own too) is told, so a value gets
/// into the local tier by a read: `b` holds `value` for key 1 locally, Redis holds it too.
async fn held_locally(server: &RedisServer, b: &Cache<u64, String>, value: &str) {
    b.invalidate(&1).await.unwrap();
    let owned = value.to_owned();
    b.get_or_load(&1, async move { Ok::<_, std::io::Error>(Some(owned)) })
        .await
        .unwrap();
    eventually("the load stored its value", async || {
        common::raw_get(server, KEY).await.is_some()
    })
    .await;
    eventually("held locally", async || {
        served_locally(server, b).await == (true, Some(value.to_owned()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backplane_carries_sets_and_invalidations_to_other_local_tiers() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server))).await;
    let b = instance(&server, Some(backplane(&server))).await;
    held_locally_only(&server, &b, "v1").await;

    a.set(&1, "v2".to_owned()).await.unwrap();
    within(SOON, "b sees a's set", async || {
        b.get(&1).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    // a's own message is skipped: its local entry (the set value) stays.
    assert_eq!(a.get(&1).await.unwrap().as_deref(), Some("v2"));

    a.invalidate(&1).await.unwrap();
    within(SOON, "b sees a's invalidation", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;

    // A load's store is published too.
    held_locally_only(&server, &b, "v3").await;
    let loaded = a
        .get_or_load(&1, async { Ok::<_, std::io::Error>(Some("v4".to_owned())) })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("v4"));
    within(SOON, "b sees a's load", async || {
        b.get(&1).await.unwrap().as_deref() == Some("v4")
    })
    .await;

    // And batched loads.
    let keys: Vec<u64> = (10..20).collect();
    let first = b
        .get_or_load_many(&keys, async |keys| {
            Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, "old".to_owned())).collect())
        })
        .await;
    assert!(
        first
            .iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("old"))
    );
    for key in &keys {
        a.invalidate(key).await.unwrap();
    }
    let _ = a
        .get_or_load_many(&keys, async |keys| {
            Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, "new".to_owned())).collect())
        })
        .await;
    for key in &keys {
        within(SOON, "b sees a's batch", async || {
            b.get(key).await.unwrap().as_deref() == Some("new")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_invalidation_a_local_tier_keeps_what_others_changed() {
    // The contrast that shows what the option buys.
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, None).await;
    let b = instance(&server, None).await;
    assert!(!b.is_listening());
    held_locally_only(&server, &b, "v1").await;
    a.set(&1, "v2".to_owned()).await.unwrap();
    tokio::time::sleep(SOON).await;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_sees_writes_made_outside_brisk() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(tracking(&server))).await;
    held_locally(&server, &b, "v1").await;
    // A plain SET by a raw client: foreign bytes, which read as a miss once the local entry
    // is gone.
    raw_set(&server, KEY, b"written outside").await;
    within(SOON, "b drops its entry after an outside SET", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;

    // Another brisk instance, without any invalidation of its own, is outside too.
    let a = instance(&server, None).await;
    held_locally(&server, &b, "v2").await;
    a.set(&1, "v3".to_owned()).await.unwrap();
    within(SOON, "b sees a's set", async || {
        b.get(&1).await.unwrap().as_deref() == Some("v3")
    })
    .await;

    // FLUSHALL empties Redis's tracking table: everything local goes.
    held_locally(&server, &b, "v4").await;
    let _ = raw(&server, &["FLUSHALL"]).await;
    within(SOON, "b drops everything after FLUSHALL", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
}

/// The id of the client whose `CLIENT LIST` flags hold `flag`.
async fn client_with_flag(server: &RedisServer, flag: char) -> String {
    find_flag(&text(raw(server, &["CLIENT", "LIST"]).await), flag)
}

fn find_flag(list: &str, flag: char) -> String {
    list.lines()
        .find(|line| {
            line.split(' ').any(|field| {
                field
                    .strip_prefix("flags=")
                    .is_some_and(|f| f.contains(flag))
            })
        })
        .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no client with flag {flag}: {list}"))
        .to_owned()
}

fn flushes(capture: &Capture) -> u64 {
    capture.counter(
        CACHE_INVALIDATIONS.name,
        &[("cache", "t"), ("kind", "flush")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_flushes_the_local_tier_and_tracking_resumes() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let b: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .redis(redis)
            .local(LocalTier::entries(1_000))
            .invalidation(tracking(&server))
            .build()
            .unwrap()
    });
    eventually("tracking is set up", async || b.is_listening()).await;
    let set_up = flushes(&capture);
    assert_eq!(set_up, 1, "the set-up flushes once");
    held_locally(&server, &b, "v1").await;

    let id = client_with_flag(&server, 't').await;
    let _ = raw(&server, &["CLIENT", "KILL", "ID", &id]).await;
    // Lost (a flush), then set up again on a new connection (another).
    eventually("tracking resumes on a new connection", async || {
        flushes(&capture) >= set_up + 2 && b.is_listening()
    })
    .await;
    assert_eq!(
        served_locally(&server, &b).await,
        (false, Some("v1".to_owned())),
        "the local entry was flushed"
    );
    assert_ne!(client_with_flag(&server, 't').await, id);

    held_locally(&server, &b, "v2").await;
    raw_set(&server, KEY, b"outside").await;
    within(SOON, "tracking works again", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backplane_connection_flushes_and_resubscribes() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server))).await;
    let b = instance(&server, Some(backplane(&server))).await;
    held_locally_only(&server, &b, "v1").await;
    let _ = raw(&server, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    eventually("b flushed after losing its subscription", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
    eventually("both subscribed again", async || {
        a.is_listening() && b.is_listening()
    })
    .await;
    // Until both listen again the local tiers are bypassed; from then on messages flow.
    eventually("two subscribers again", async || {
        raw(&server, &["PUBSUB", "NUMSUB", "brisk:t:1:inv"]).await
            == redis::Value::Array(vec![
                redis::Value::BulkString(b"brisk:t:1:inv".to_vec()),
                redis::Value::Int(2),
            ])
    })
    .await;
    held_locally_only(&server, &b, "v2").await;
    a.invalidate(&1).await.unwrap();
    within(SOON, "b hears a again", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_a_publishers_numbers_or_a_foreign_message_flushes_the_local_tier() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(backplane(&server))).await;
    let channel = "brisk:t:1:inv";
    held_locally_only(&server, &b, "v1").await;
    // A publisher's first message, and its next, about keys b does not hold: nothing goes.
    let _ = raw(&server, &["PUBLISH", channel, "00000000000000ab:7:k4:i:99"]).await;
    let _ = raw(&server, &["PUBLISH", channel, "00000000000000ab:8:k"]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("v1"));
    // Number 9 lost: at 10, b cannot know what 9 said.
    let _ = raw(&server, &["PUBLISH", channel, "00000000000000ab:10:k"]).await;
    within(SOON, "a gap flushes", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;

    held_locally_only(&server, &b, "v2").await;
    let _ = raw(&server, &["PUBLISH", channel, "not a message of ours"]).await;
    within(SOON, "a foreign message flushes", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;

    // A key message names its key: only that key goes.
    held_locally_only(&server, &b, "v3").await;
    let _ = raw(&server, &["PUBLISH", channel, "00000000000000cd:0:k3:i:1"]).await;
    within(SOON, "the named key goes", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_type_that_cannot_decode_flushes_instead() {
    #[derive(Clone, PartialEq, Eq, Hash)]
    struct Opaque(u64);
    impl brisk_cache::CacheKey for Opaque {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
    }
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let build = async || -> Cache<Opaque, String> {
        Cache::builder("t")
            .redis(connect(&server).await)
            .local(LocalTier::entries(100))
            .invalidation(backplane(&server))
            .build()
            .unwrap()
    };
    let (a, b) = (build().await, build().await);
    eventually("listening", async || a.is_listening() && b.is_listening()).await;
    b.set(&Opaque(2), "other key".to_owned()).await.unwrap();
    b.set(&Opaque(1), "v1".to_owned()).await.unwrap();
    let _ = raw(&server, &["DEL", "{brisk:t:1:i:2}"]).await;
    assert_eq!(
        b.get(&Opaque(2)).await.unwrap().as_deref(),
        Some("other key")
    );
    a.set(&Opaque(1), "v2".to_owned()).await.unwrap();
    within(SOON, "b sees a's set", async || {
        b.get(&Opaque(1)).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    // The whole local tier went: the other key is read from Redis, where it is gone.
    assert_eq!(b.get(&Opaque(2)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_backplane_reaches_every_instance() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let urls = cluster.urls();
    // Each instance listens on another node: the cluster forwards every PUBLISH to all.
    let on_cluster = async |node: usize| -> Cache<u64, String> {
        let cache = Cache::builder("c")
            .redis(client.get_async_connection().await.unwrap())
            .local(LocalTier::entries(100))
            .invalidation(Invalidation::backplane(Multiplexed::builder(&urls[node])))
            .build()
            .unwrap();
        eventually("listening", async || cache.is_listening()).await;
        cache
    };
    let (a, b) = (on_cluster(0).await, on_cluster(2).await);
    for key in 0..20_u64 {
        b.set(&key, "old".to_owned()).await.unwrap();
    }
    for key in 0..20_u64 {
        a.set(&key, format!("new {key}")).await.unwrap();
    }
    for key in 0..20_u64 {
        within(SOON, "b sees a's set", async || {
            b.get(&key).await.unwrap() == Some(format!("new {key}"))
        })
        .await;
    }

    // Tracking would need every primary: refused.
    let refused = Cache::<u64, String>::builder("c")
        .redis(client.get_async_connection().await.unwrap())
        .invalidation(Invalidation::tracking(Multiplexed::builder(&urls[0])))
        .build();
    assert!(
        matches!(refused, Err(BuildError::Invalidation(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn invalidation_without_redis_is_refused() {
    let refused = Cache::<u64, String>::builder("t")
        .invalidation(Invalidation::backplane(Multiplexed::builder(
            "redis://127.0.0.1:1",
        )))
        .build();
    assert!(
        matches!(refused, Err(BuildError::Invalidation(_))),
        "{refused:?}"
    );
}

#[test]
fn invalidation_outside_a_runtime_is_refused() {
    let server = redis();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let source = runtime.block_on(connect(&server));
    let refused = Cache::<u64, String>::builder("t")
        .redis(source)
        .invalidation(backplane(&server))
        .build();
    assert!(
        matches!(refused, Err(BuildError::Invalidation(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_invalidation_server_bypasses_the_local_tier_until_it_answers() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    // The listener points at a server that is not there yet.
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    let b: Cache<u64, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .invalidation(Invalidation::backplane(Multiplexed::builder(&url)))
        .build()
        .unwrap();
    b.set(&1, "v1".to_owned()).await.unwrap();
    let _ = raw(&server, &["DEL", KEY]).await;
    assert!(!b.is_listening());
    assert_eq!(
        b.get(&1).await.unwrap(),
        None,
        "not kept locally while deaf"
    );
    let late = tokio::task::spawn_blocking(move || {
        RedisServer::builder().private().port(port).start().unwrap()
    })
    .await
    .unwrap();
    eventually("listening once the server is up", async || b.is_listening()).await;
    drop(late);
}
