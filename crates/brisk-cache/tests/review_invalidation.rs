//! Review: hostile tests of the invalidation connection (backplane, tracking), tags and clear,
//! written from `docs/caching.md` and the public API only.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_cache::{BuildError, Cache, CacheKey, Error, Invalidation, LocalTier};
use brisk_pool::redis_source::Multiplexed;
use brisk_testkit::RedisServer;
use common::{connect, eventually, raw, raw_get, raw_set, reads, redis, text, within};
use tokio::time::Instant;

type C = Cache<u64, String>;

const SOON: Duration = Duration::from_millis(100);
const CHANNEL: &str = "brisk:t:1:inv";

fn rkey(key: u64) -> String {
    format!("{{brisk:t:1:i:{key}}}")
}

fn backplane(url: &str) -> Invalidation {
    Invalidation::backplane(Multiplexed::builder(url))
}

fn tracking(url: &str) -> Invalidation {
    Invalidation::tracking(Multiplexed::builder(url))
}

/// An instance of cache `t` over `server`, with a local tier that keeps entries a minute, and
/// (if given) an invalidation connection it waits for.
async fn instance(server: &RedisServer, invalidation: Option<Invalidation>) -> C {
    let builder = Cache::builder("t")
        .redis(connect(server).await)
        .local(LocalTier::entries(100_000));
    match invalidation {
        Some(invalidation) => {
            let cache = builder.invalidation(invalidation).build().unwrap();
            within(Duration::from_secs(3), "listening", async || {
                cache.is_listening()
            })
            .await;
            cache
        }
        None => builder.build().unwrap(),
    }
}

async fn publish(server: &RedisServer, message: &[u8]) {
    let _ = raw(server, &[b"PUBLISH", CHANNEL.as_bytes(), message]).await;
}

/// Whether `b` answers `key` without reading Redis, and what.
async fn served_locally(server: &RedisServer, b: &C, key: u64) -> (bool, Option<String>) {
    let before = reads(server).await;
    let value = b.get(&key).await.unwrap();
    (reads(server).await == before, value)
}

/// `b` holds `value` for `key` in its local tier, and Redis no longer does (DEL behind the
/// cache's back: only for caches that do not track).
async fn held_locally_only(server: &RedisServer, b: &C, key: u64, value: &str) {
    b.invalidate(&key).await.unwrap();
    let owned = value.to_owned();
    let got = b
        .get_or_load(&key, async move { Ok::<_, std::io::Error>(Some(owned)) })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(value));
    eventually("the load stored its value", async || {
        raw_get(server, &rkey(key)).await.is_some()
    })
    .await;
    let _ = raw(server, &["DEL", &rkey(key)]).await;
    assert_eq!(
        b.get(&key).await.unwrap().as_deref(),
        Some(value),
        "served locally"
    );
}

/// With tracking: `b` holds `value` for `key` locally, Redis holds it too.
async fn held_tracked(server: &RedisServer, b: &C, key: u64, value: &str) {
    b.invalidate(&key).await.unwrap();
    let owned = value.to_owned();
    b.get_or_load(&key, async move { Ok::<_, std::io::Error>(Some(owned)) })
        .await
        .unwrap();
    eventually("the load stored its value", async || {
        raw_get(server, &rkey(key)).await.is_some()
    })
    .await;
    eventually("held locally", async || {
        served_locally(server, b, key).await == (true, Some(value.to_owned()))
    })
    .await;
}

async fn client_list(server: &RedisServer) -> String {
    text(raw(server, &["CLIENT", "LIST"]).await)
}

/// Ids of the clients whose flags hold `flag`.
fn clients_with_flag(list: &str, flag: char) -> Vec<String> {
    list.lines()
        .filter(|line| {
            line.split(' ').any(|field| {
                field
                    .strip_prefix("flags=")
                    .is_some_and(|f| f.contains(flag))
            })
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect()
}

fn pubsub_clients(list: &str) -> usize {
    list.lines()
        .filter(|line| {
            line.split(' ')
                .any(|f| f.strip_prefix("sub=").is_some_and(|n| n != "0"))
        })
        .count()
}

/// A stand-in for the source of truth: a version per key.
#[derive(Clone, Default)]
struct Db(Arc<Mutex<HashMap<u64, u64>>>);

impl Db {
    fn value(key: u64, version: u64) -> String {
        format!("k{key}v{version}")
    }
    fn read(
        &self,
        key: u64,
    ) -> impl Future<Output = Result<Option<String>, std::io::Error>> + Send + 'static {
        let db = self.clone();
        async move {
            // Read now, then take a moment: a load that races the writes.
            let version = db.0.lock().unwrap().get(&key).copied().unwrap_or(0);
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..1_500))).await;
            Ok(Some(Self::value(key, version)))
        }
    }
    fn write(
        &self,
        key: u64,
        version: u64,
    ) -> impl Future<Output = Result<(), std::io::Error>> + Send + 'static {
        let db = self.clone();
        async move {
            db.0.lock().unwrap().insert(key, version);
            Ok(())
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Writes {
    WriteThrough,
    InvalidateAfter,
    Set,
}

/// Readers on `b` load keys from the db while `a` writes them (and, with `kill`, the
/// listening connections are killed every 40 ms). Once the writes are done and `b` listens,
/// `b` must serve the final values within a short bound.
async fn race(server: &RedisServer, a: &C, b: &C, writes: Writes, kill: Option<&'static str>) {
    const KEYS: u64 = 24;
    const ROUNDS: u64 = 150;
    let db = Db::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..6 {
        let (b, db, stop) = (b.clone(), db.clone(), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let key = fastrand::u64(0..KEYS);
                b.get_or_load(&key, db.read(key)).await.unwrap();
                if fastrand::bool() {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let killer = kill.map(|kind| {
        let url = server.url();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(15)).await;
                if kind == "pubsub" {
                    let _: redis::RedisResult<redis::Value> = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("pubsub")
                        .query_async(&mut conn)
                        .await;
                } else {
                    let list: String = redis::cmd("CLIENT")
                        .arg("LIST")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    for id in clients_with_flag(&list, 't') {
                        let _: redis::RedisResult<redis::Value> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("ID")
                            .arg(&id)
                            .query_async(&mut conn)
                            .await;
                    }
                }
            }
        })
    });
    for round in 1..=ROUNDS {
        let mut writers = Vec::new();
        for key in 0..KEYS {
            let (a, db) = (a.clone(), db.clone());
            writers.push(tokio::spawn(async move {
                let value = Db::value(key, round);
                match writes {
                    Writes::WriteThrough => {
                        a.write_through(&key, value, db.write(key, round))
                            .await
                            .unwrap();
                    }
                    Writes::InvalidateAfter => {
                        db.write(key, round).await.unwrap();
                        a.invalidate(&key).await.unwrap();
                    }
                    Writes::Set => {
                        db.write(key, round).await.unwrap();
                        a.set(&key, value).await.unwrap();
                    }
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    if let Some(killer) = killer {
        killer.await.unwrap();
    }
    within(Duration::from_secs(3), "both listen again", async || {
        a.is_listening() && b.is_listening()
    })
    .await;
    for key in 0..KEYS {
        let want = Db::value(key, ROUNDS);
        let started = Instant::now();
        loop {
            let got = b.get_or_load(&key, db.read(key)).await.unwrap();
            if got.as_deref() == Some(want.as_str()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(300),
                "key {key}: b still serves {got:?} 300 ms after the last write ({want})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// ---------------------------------------------------------------- coherence under races

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_write_through_racing_loads_on_b_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    race(&server, &a, &b, Writes::WriteThrough, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_invalidate_after_db_write_racing_loads_on_b_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    race(&server, &a, &b, Writes::InvalidateAfter, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_set_racing_loads_on_b_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(tracking(&server.url()))).await;
    let b = instance(&server, Some(tracking(&server.url()))).await;
    race(&server, &a, &b, Writes::Set, None).await;
}

/// `a` has no invalidation of its own (tracking hears it as any outside writer). Every call is
/// bounded: a load by the hard timeout (2 s here), a write by two remote timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_write_through_from_a_plain_instance_racing_loads_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a: C = Cache::builder("t")
        .redis(connect(&server).await)
        .hard_timeout(Duration::from_secs(2))
        .ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    let b: C = Cache::builder("t")
        .redis(connect(&server).await)
        .hard_timeout(Duration::from_secs(2))
        // Short, so that a wait that lasts until an entry expires stays within the test's time.
        .ttl(Duration::from_secs(5))
        .local(LocalTier::entries(1_000))
        .invalidation(tracking(&server.url()))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "listening", async || {
        b.is_listening()
    })
    .await;
    race_plain(&server, &a, &b).await;
}

/// As `race`, for a writer that does not listen; each call bounded.
async fn race_plain(_server: &RedisServer, a: &C, b: &C) {
    const KEYS: u64 = 24;
    const ROUNDS: u64 = 600;
    const LOAD_BOUND: Duration = Duration::from_millis(3_000);
    const WRITE_BOUND: Duration = Duration::from_millis(1_000);
    let db = Db::default();
    let stop = Arc::new(AtomicBool::new(false));
    let slow_reads = Arc::new(Mutex::new(Vec::<(u64, Duration)>::new()));
    let slow_writes = Arc::new(Mutex::new(Vec::<(u64, u64, Duration)>::new()));
    let mut readers = Vec::new();
    for _ in 0..6 {
        let (b, db, stop, slow) = (
            b.clone(),
            db.clone(),
            Arc::clone(&stop),
            Arc::clone(&slow_reads),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let key = fastrand::u64(0..KEYS);
                let started = Instant::now();
                // Bounded here so that the test is; what it took is checked below.
                let result =
                    tokio::time::timeout(Duration::from_secs(6), b.get_or_load(&key, db.read(key)))
                        .await;
                let took = started.elapsed();
                if took > LOAD_BOUND || result.is_err() {
                    slow.lock().unwrap().push((key, took));
                    return;
                }
                result.unwrap().unwrap();
            }
        }));
    }
    let writing = Instant::now();
    for round in 1..=ROUNDS {
        if writing.elapsed() > Duration::from_secs(2) {
            break;
        }
        let mut writers = Vec::new();
        for key in 0..KEYS {
            let (a, db, slow) = (a.clone(), db.clone(), Arc::clone(&slow_writes));
            writers.push(tokio::spawn(async move {
                let started = Instant::now();
                let write = a.write_through(&key, Db::value(key, round), db.write(key, round));
                let result = tokio::time::timeout(Duration::from_secs(3), write).await;
                let took = started.elapsed();
                match result {
                    Ok(written) if took <= WRITE_BOUND => written.unwrap(),
                    _ => slow.lock().unwrap().push((key, round, took)),
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
    }
    let wrote_for = writing.elapsed();
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let (slow_reads, slow_writes) = (
        slow_reads.lock().unwrap().clone(),
        slow_writes.lock().unwrap().clone(),
    );
    assert!(
        slow_reads.is_empty() && slow_writes.is_empty(),
        "unbounded waits (hard timeout 2 s, remote timeout 100 ms): reads (key, took) over \
         {LOAD_BOUND:?}: {slow_reads:?}; write_throughs (key, round, took) over {WRITE_BOUND:?}: \
         {:?} (of {}); the writes took {wrote_for:?} in all",
        &slow_writes[..slow_writes.len().min(5)],
        slow_writes.len()
    );
    let last = db.0.lock().unwrap().clone();
    for key in 0..KEYS {
        let want = Db::value(key, last.get(&key).copied().unwrap_or(0));
        within(
            Duration::from_millis(300),
            &format!("key {key} converges to {want}"),
            async || {
                let got = tokio::time::timeout(LOAD_BOUND, b.get_or_load(&key, db.read(key)))
                    .await
                    .unwrap_or_else(|_| panic!("final read of key {key} took over {LOAD_BOUND:?}"));
                got.unwrap().as_deref() == Some(want.as_str())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_race_with_pubsub_connections_killed_repeatedly_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    race(&server, &a, &b, Writes::WriteThrough, Some("pubsub")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_race_with_tracking_connections_killed_repeatedly_converges() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(tracking(&server.url()))).await;
    let b = instance(&server, Some(tracking(&server.url()))).await;
    race(&server, &a, &b, Writes::Set, Some("tracking")).await;
}

/// A load under way on b when a sets the key: b's callers get what it loaded, but b keeps
/// nothing of it locally, and Redis ends with a's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_under_way_on_b_when_a_sets_keeps_nothing_on_b() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    for invalidation in [backplane as fn(&str) -> Invalidation, tracking] {
        let _ = raw(&server, &["FLUSHALL"]).await;
        let a = instance(&server, Some(invalidation(&server.url()))).await;
        let b = instance(&server, Some(invalidation(&server.url()))).await;
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let slow = tokio::spawn({
            let b = b.clone();
            async move {
                b.get_or_load(&7, async move {
                    let _ = released.await;
                    Ok::<_, std::io::Error>(Some("old".to_owned()))
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.set(&7, "new".to_owned()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("old"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        within(
            SOON,
            "b serves a's value after its own stale load",
            async || b.get(&7).await.unwrap().as_deref() == Some("new"),
        )
        .await;
        // And it stays so (nothing stale is re-kept).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.get(&7).await.unwrap().as_deref(), Some("new"));
        assert_eq!(a.get(&7).await.unwrap().as_deref(), Some("new"));
    }
}

/// A batch under way on b when a invalidates one of its keys: b keeps nothing of that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_under_way_on_b_when_a_writes_keeps_nothing_on_b() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let keys: Vec<u64> = (1..=10).collect();
    let batch = tokio::spawn({
        let (b, keys) = (b.clone(), keys.clone());
        async move {
            b.get_or_load_many(&keys, async move |missing: Vec<u64>| {
                let _ = released.await;
                Ok::<_, std::io::Error>(
                    missing
                        .into_iter()
                        .map(|k| (k, "old".to_owned()))
                        .collect::<HashMap<_, _>>(),
                )
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    a.set(&3, "new".to_owned()).await.unwrap();
    a.invalidate(&4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    release.send(()).unwrap();
    let got = batch.await.unwrap();
    assert!(
        got.iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("old"))
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.get(&3).await.unwrap().as_deref(), Some("new"), "key 3");
    assert_eq!(b.get(&4).await.unwrap(), None, "key 4");
    assert_eq!(b.get(&5).await.unwrap().as_deref(), Some("old"), "key 5");
}

/// One huge batch on a (20,000 keys, one store) reaches b for every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_batch_on_a_reaches_b_for_every_key() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    let keys: Vec<u64> = (0..20_000).collect();
    let load = |value: &'static str| {
        async move |missing: Vec<u64>| {
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|k| (k, value.to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
        }
    };
    let first = b.get_or_load_many(&keys, load("old")).await;
    assert!(
        first
            .iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("old"))
    );
    eventually("b's batch stored", async || {
        raw_get(&server, &rkey(19_999)).await.is_some()
    })
    .await;
    // Behind both caches' backs (backplane does not hear it).
    let _ = raw(&server, &["FLUSHDB"]).await;
    let second = a.get_or_load_many(&keys, load("new")).await;
    assert!(
        second
            .iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("new"))
    );
    let never = async |_: Vec<u64>| Ok::<_, std::io::Error>(HashMap::<u64, String>::new());
    within(
        Duration::from_secs(2),
        "b sees every key of a's batch",
        async || {
            let seen = b.get_or_load_many(&keys, never).await;
            seen.iter()
                .all(|r| r.as_ref().unwrap().as_deref() == Some("new"))
        },
    )
    .await;
}

/// An instance's own messages are skipped: after a sets 200 keys, it serves them all locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_own_messages_do_not_drop_own_entries() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    for key in 0..200 {
        a.set(&key, format!("v{key}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = reads(&server).await;
    for key in 0..200 {
        assert_eq!(a.get(&key).await.unwrap(), Some(format!("v{key}")));
    }
    assert_eq!(reads(&server).await, before, "all 200 answered locally");
}

// ---------------------------------------------------------------- connection faults

/// The listening connection on a server of its own, which is killed and restarted: while
/// it is gone the local tier is bypassed; after, it serves again and hears again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listening_server_bypasses_the_local_tier_until_it_is_back() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let mut listen = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(backplane(&listen.url()))).await;
    held_locally_only(&server, &b, 1, "v1").await;

    listen = tokio::task::spawn_blocking(move || {
        listen.kill().unwrap();
        listen
    })
    .await
    .unwrap();
    within(Duration::from_secs(1), "the loss is noticed", async || {
        !b.is_listening()
    })
    .await;
    assert_eq!(
        b.get(&1).await.unwrap(),
        None,
        "the loss emptied the local tier"
    );
    // Deaf: a read goes to Redis every time.
    b.set(&2, "v2".to_owned()).await.unwrap();
    assert_eq!(b.get(&2).await.unwrap().as_deref(), Some("v2"));
    let _ = raw(&server, &["DEL", &rkey(2)]).await;
    assert_eq!(
        b.get(&2).await.unwrap(),
        None,
        "not kept locally while deaf"
    );

    listen = tokio::task::spawn_blocking(move || {
        listen.restart().unwrap();
        listen
    })
    .await
    .unwrap();
    within(Duration::from_secs(3), "listening again", async || {
        b.is_listening()
    })
    .await;
    held_locally_only(&server, &b, 3, "v3").await;
    let _ = raw(&listen, &["PUBLISH", CHANNEL, "00000000000000ab:0:k4:i:3"]).await;
    within(SOON, "b hears the restarted server", async || {
        b.get(&3).await.unwrap().is_none()
    })
    .await;
}

/// A paused listening server (a silent peer): the docs say it is noticed when three pings in
/// a row time out (pinged every second; the builder's default timeouts), then the local tier
/// is emptied and bypassed; after resume it listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_listening_server_is_noticed_by_pings() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let mut listen = tokio::task::spawn_blocking(redis).await.unwrap();
    let url = listen.url();
    let b = instance(&server, Some(backplane(&url))).await;
    held_locally_only(&server, &b, 1, "v1").await;
    listen.pause().unwrap();
    let paused = Instant::now();
    let listen = tokio::task::spawn_blocking(move || {
        assert!(
            listen.command(&["PING"]).is_err(),
            "the server is really paused"
        );
        listen
    })
    .await
    .unwrap();
    let mut listen = listen;
    within(
        Duration::from_secs(8),
        "a silent listening server is noticed (three pings in a row timed out)",
        async || !b.is_listening(),
    )
    .await;
    let _ = paused;
    assert_eq!(
        b.get(&1).await.unwrap(),
        None,
        "the loss emptied the local tier"
    );
    listen.resume().unwrap();
    within(
        Duration::from_secs(3),
        "listening again after resume",
        async || b.is_listening(),
    )
    .await;
    held_locally_only(&server, &b, 2, "v2").await;
}

/// A restart of the one server (data and listening, empty after): nothing from before is
/// served, listening resumes, and tracking works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_flushes_and_tracking_resumes() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(tracking(&server.url()))).await;
    held_tracked(&server, &b, 1, "v1").await;
    server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    within(
        Duration::from_secs(1),
        "nothing from before the restart is served",
        async || b.get(&1).await.unwrap().is_none(),
    )
    .await;
    within(Duration::from_secs(3), "listening again", async || {
        b.is_listening()
    })
    .await;
    held_tracked(&server, &b, 2, "v2").await;
    raw_set(&server, &rkey(2), b"outside").await;
    within(SOON, "tracking works after the restart", async || {
        b.get(&2).await.unwrap().is_none()
    })
    .await;
}

/// A listening URL at something that accepts connections and never answers: never listening,
/// the local tier never serves, and the cache works (reads, writes) through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_peer_that_never_answers_keeps_the_local_tier_off() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    for invalidation in [backplane(&url), tracking(&url)] {
        let b: C = Cache::builder("t")
            .redis(connect(&server).await)
            .local(LocalTier::entries(100))
            .invalidation(invalidation)
            .build()
            .unwrap();
        let started = Instant::now();
        b.set(&1, "v1".to_owned()).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a set is not held up"
        );
        let _ = raw(&server, &["DEL", &rkey(1)]).await;
        for _ in 0..20 {
            assert!(!b.is_listening());
            assert_eq!(b.get(&1).await.unwrap(), None, "never kept locally");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(accepted.load(Ordering::SeqCst) >= 1, "it did try");
    acceptor.abort();
}

// ---------------------------------------------------------------- backplane protocol

/// Messages it cannot read empty the local tier, and never stop it listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_flushes_and_listening_goes_on() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    let huge = vec![b'A'; 4 << 20];
    let mut huge_len = b"00000000000000e1:0:k".to_vec();
    huge_len.extend_from_slice(b"99999999999999999999999999999:i:1");
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x01, b':', 0x80]),
        ("no number", b"00000000000000e2".to_vec()),
        ("not a number", b"00000000000000e3:x:k4:i:99".to_vec()),
        (
            "number overflow",
            b"00000000000000e4:99999999999999999999999999:k4:i:99".to_vec(),
        ),
        (
            "length past the end",
            b"00000000000000e5:0:k999:i:1".to_vec(),
        ),
        ("length overflow", huge_len),
        ("unknown kind", b"00000000000000e6:0:z4:i:99".to_vec()),
        ("4 MiB", huge),
    ];
    for (what, message) in garbage {
        held_locally_only(&server, &b, 1, "old").await;
        publish(&server, &message).await;
        within(SOON, &format!("{what}: the message flushes"), async || {
            b.get(&1).await.unwrap().is_none()
        })
        .await;
        assert!(b.is_listening(), "{what}: still listening");
    }
    // The listener still hears real messages.
    held_locally_only(&server, &b, 2, "old").await;
    a.set(&2, "new".to_owned()).await.unwrap();
    within(SOON, "a's set still reaches b", async || {
        b.get(&2).await.unwrap().as_deref() == Some("new")
    })
    .await;
}

/// A valid message about a key of another shape (a string key in a cache of integers) cannot
/// name any entry; and a repeated number (a replayed message) must not be taken as news
/// about nothing: it either flushes or drops the key, never leaves the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_numbering_backwards_is_a_gap() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(backplane(&server.url()))).await;
    held_locally_only(&server, &b, 1, "v1").await;
    publish(&server, b"00000000000000f0:5:k").await;
    publish(&server, b"00000000000000f0:6:k").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        b.get(&1).await.unwrap().as_deref(),
        Some("v1"),
        "no gap yet"
    );
    // 7..=99 lost.
    publish(&server, b"00000000000000f0:100:k").await;
    within(SOON, "a gap of many flushes", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;
    // A publisher that restarted its numbers (or a stale replay): 3 after 100.
    held_locally_only(&server, &b, 1, "v2").await;
    publish(&server, b"00000000000000f0:3:k").await;
    within(
        SOON,
        "numbers going back are not in order: flush",
        async || b.get(&1).await.unwrap().is_none(),
    )
    .await;
}

// ---------------------------------------------------------------- tracking

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_sees_del_expire_rename_and_flushdb() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(tracking(&server.url()))).await;
    let writer = instance(&server, None).await;

    held_tracked(&server, &b, 1, "v1").await;
    let _ = raw(&server, &["DEL", &rkey(1)]).await;
    within(SOON, "DEL", async || b.get(&1).await.unwrap().is_none()).await;

    held_tracked(&server, &b, 1, "v1").await;
    let _ = raw(&server, &["PEXPIRE", &rkey(1), "1"]).await;
    within(SOON, "PEXPIRE", async || b.get(&1).await.unwrap().is_none()).await;

    // RENAME another entry onto key 1.
    held_tracked(&server, &b, 1, "v1").await;
    writer.set(&5, "v5".to_owned()).await.unwrap();
    let _ = raw(&server, &["RENAME", &rkey(5), &rkey(1)]).await;
    within(SOON, "RENAME onto the key", async || {
        b.get(&1).await.unwrap().as_deref() != Some("v1")
    })
    .await;

    // RENAME the key away.
    held_tracked(&server, &b, 1, "v1").await;
    let _ = raw(&server, &["RENAME", &rkey(1), "elsewhere"]).await;
    within(SOON, "RENAME away", async || {
        b.get(&1).await.unwrap().is_none()
    })
    .await;

    // SET with another type of value (a list) under the key.
    held_tracked(&server, &b, 1, "v1").await;
    let _ = raw(&server, &["DEL", &rkey(1)]).await;
    within(SOON, "DEL", async || b.get(&1).await.unwrap().is_none()).await;
    held_tracked(&server, &b, 1, "v1").await;
    let _ = raw(&server, &["SELECT", "0"]).await;
    let _ = raw(&server, &["FLUSHDB"]).await;
    within(SOON, "FLUSHDB", async || b.get(&1).await.unwrap().is_none()).await;
    assert!(b.is_listening());
}

/// A write to a lease key is ignored: the local entry stays (no read of Redis), and nothing
/// else is flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_ignores_writes_to_lease_keys() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b = instance(&server, Some(tracking(&server.url()))).await;
    held_tracked(&server, &b, 1, "v1").await;
    held_tracked(&server, &b, 2, "v2").await;
    for _ in 0..5 {
        raw_set(&server, &format!("{}:lease", rkey(1)), b"someone's token").await;
        let _ = raw(&server, &["DEL", &format!("{}:lease", rkey(2))]).await;
        raw_set(&server, &format!("{}:lease", rkey(3)), b"x").await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        served_locally(&server, &b, 1).await,
        (true, Some("v1".to_owned())),
        "key 1 stays local"
    );
    assert_eq!(
        served_locally(&server, &b, 2).await,
        (true, Some("v2".to_owned())),
        "key 2 stays local"
    );
}

// ---------------------------------------------------------------- key types

/// A key type without `decode`, over tracking: an outside write to one key empties the
/// whole local tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_with_a_key_type_that_cannot_decode_flushes_everything() {
    #[derive(Clone, PartialEq, Eq, Hash)]
    struct Opaque(u64);
    impl CacheKey for Opaque {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
    }
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let b: Cache<Opaque, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .invalidation(tracking(&server.url()))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "listening", async || {
        b.is_listening()
    })
    .await;
    for key in [1, 2] {
        b.set(&Opaque(key), format!("v{key}")).await.unwrap();
    }
    // Read again into the local tier (the stores came back as invalidations).
    eventually("key 2 held locally", async || {
        let before = reads(&server).await;
        let hit = b.get(&Opaque(2)).await.unwrap().is_some();
        hit && reads(&server).await == before
    })
    .await;
    raw_set(&server, &rkey(1), b"outside").await;
    within(SOON, "key 1 dropped", async || {
        b.get(&Opaque(1)).await.unwrap().is_none()
    })
    .await;
    let before = reads(&server).await;
    assert_eq!(b.get(&Opaque(2)).await.unwrap().as_deref(), Some("v2"));
    assert!(
        reads(&server).await > before,
        "key 2 was read from Redis: the tier was emptied"
    );
}

/// An emptying of the local tier (a message it cannot read, or an invalidation of a key
/// type that cannot decode) is local: a load of another key under way meanwhile, which no
/// write superseded, still stores its value in Redis ("its value goes to every waiter and
/// the local tier, then to Redis — only while its lease stands").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptying_does_not_cancel_the_redis_store_of_an_unrelated_load() {
    #[derive(Clone, PartialEq, Eq, Hash)]
    struct Opaque(u64);
    impl CacheKey for Opaque {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
    }
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let plain = instance(&server, Some(backplane(&server.url()))).await;
    let opaque: Cache<Opaque, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .invalidation(tracking(&server.url()))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "listening", async || {
        opaque.is_listening()
    })
    .await;
    let mut outcomes = Vec::new();
    for (what, key) in [
        ("control: no emptying", 4_u64),
        ("garbage on the backplane", 2),
        ("tracking, undecodable key", 3),
    ] {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let load = async move {
            let _ = released.await;
            Ok::<_, std::io::Error>(Some("loaded".to_owned()))
        };
        let slow = if key != 3 {
            let plain = plain.clone();
            tokio::spawn(async move { plain.get_or_load(&key, load).await })
        } else {
            let opaque = opaque.clone();
            tokio::spawn(async move { opaque.get_or_load(&Opaque(3), load).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        if key == 2 {
            publish(&server, b"not a message of ours").await;
        } else if key == 3 {
            raw_set(&server, &rkey(1), b"outside write of another key").await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("loaded"));
        let started = Instant::now();
        let mut stored = false;
        while started.elapsed() < Duration::from_secs(1) {
            if raw_get(&server, &rkey(key)).await.is_some() {
                stored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes.push((what, stored));
    }
    assert!(outcomes[0].1, "the control stores: {outcomes:?}");
    assert!(
        outcomes.iter().all(|(_, stored)| *stored),
        "the load's value reached Redis: {outcomes:?}"
    );
}

/// A key type whose `decode` panics (for one value): the listener must survive it, and
/// keep dropping what others change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_type_whose_decode_panics_does_not_kill_the_listener() {
    #[derive(Clone, PartialEq, Eq, Hash, Debug)]
    struct Bomb(u64);
    impl CacheKey for Bomb {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
        fn decode(bytes: &[u8]) -> Option<Self> {
            let key = u64::decode(bytes)?;
            assert!(key != 666, "decode bomb");
            Some(Bomb(key))
        }
    }
    keyed_bomb::<Bomb>(Bomb).await;
}

/// A key type whose `Hash` panics (for one value, which this instance never uses itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_type_whose_hash_panics_does_not_kill_the_listener() {
    #[derive(Clone, PartialEq, Eq, Debug)]
    struct Bomb(u64);
    impl std::hash::Hash for Bomb {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            assert!(self.0 != 666, "hash bomb");
            self.0.hash(state);
        }
    }
    impl CacheKey for Bomb {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
        fn decode(bytes: &[u8]) -> Option<Self> {
            u64::decode(bytes).map(Bomb)
        }
    }
    keyed_bomb::<Bomb>(Bomb).await;
}

/// `b` (keys of type `K`, which blow up on 666) and `a` (u64 keys, same encoding and name).
async fn keyed_bomb<K>(make: fn(u64) -> K)
where
    K: CacheKey + Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b: Cache<K, String> = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .invalidation(backplane(&server.url()))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "listening", async || {
        b.is_listening()
    })
    .await;
    // a writes the key b cannot take.
    a.set(&666, "boom".to_owned()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // b holds key 1 locally, Redis does not.
    b.set(&make(1), "v1".to_owned()).await.unwrap();
    let _ = raw(&server, &["DEL", &rkey(1)]).await;
    assert_eq!(b.get(&make(1)).await.unwrap().as_deref(), Some("v1"));
    a.set(&1, "v2".to_owned()).await.unwrap();
    within(SOON, "b still hears a after the bad key", async || {
        b.get(&make(1)).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    a.set(&666, "boom again".to_owned()).await.unwrap();
    a.set(&1, "v3".to_owned()).await.unwrap();
    within(SOON, "and again", async || {
        b.get(&make(1)).await.unwrap().as_deref() == Some("v3")
    })
    .await;
}

// ---------------------------------------------------------------- bad config

#[test]
fn tracking_outside_a_runtime_is_refused() {
    let server = redis();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let source = runtime.block_on(connect(&server));
    let refused = Cache::<u64, String>::builder("t")
        .redis(source)
        .local(LocalTier::entries(10))
        .invalidation(tracking(&server.url()))
        .build();
    assert!(
        matches!(refused, Err(BuildError::Invalidation(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn tracking_on_the_in_memory_tier_is_refused() {
    let refused = Cache::<u64, String>::builder("t")
        .local(LocalTier::entries(10))
        .in_memory(1 << 20)
        .invalidation(tracking("redis://127.0.0.1:1"))
        .build();
    assert!(
        matches!(refused, Err(BuildError::Invalidation(_))),
        "{refused:?}"
    );
}

// ---------------------------------------------------------------- drop

/// Dropping the cache (every clone) ends its listening connection: no leak of connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cache_closes_its_listening_connections() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let mut caches = Vec::new();
    for i in 0..10 {
        let invalidation = if i % 2 == 0 {
            backplane(&server.url())
        } else {
            tracking(&server.url())
        };
        caches.push(instance(&server, Some(invalidation)).await);
    }
    let list = client_list(&server).await;
    assert_eq!(pubsub_clients(&list), 5, "{list}");
    assert_eq!(clients_with_flag(&list, 't').len(), 5, "{list}");
    let clone = caches[0].clone();
    drop(caches);
    within(
        Duration::from_secs(3),
        "the dropped caches' connections close",
        async || {
            let list = client_list(&server).await;
            pubsub_clients(&list) == 1 && clients_with_flag(&list, 't').is_empty()
        },
    )
    .await;
    assert!(clone.is_listening(), "a clone still alive keeps listening");
    drop(clone);
    within(Duration::from_secs(3), "the last one closes", async || {
        pubsub_clients(&client_list(&server).await) == 0
    })
    .await;
}

/// Dropped while its listening server is unreachable (retrying): the retry loop ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_cache_whose_listener_retries_ends_the_retries() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&attempts);
    let acceptor = tokio::spawn(async move {
        while let Ok((socket, _)) = silent.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket); // closes at once: every attempt fails
        }
    });
    let b: C = Cache::builder("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(10))
        .invalidation(backplane(&format!("redis://127.0.0.1:{port}")))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "it tries", async || {
        attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after_drop = attempts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        after_drop,
        "no more connection attempts after the drop"
    );
    acceptor.abort();
}

// ---------------------------------------------------------------- tags and clear

fn tagged(name: &str) -> brisk_cache::CacheBuilder<u64, String> {
    Cache::builder(name).tags(|id: &u64, _: Option<&String>| vec![format!("group:{}", id % 10)])
}

/// `clear` (or `invalidate_tag`) then `set` at once: the new entry, written after the
/// invalidation returned, is a hit every time ("a miss from now on" is about entries made
/// before it). Over 100 rounds, counts the rounds whose fresh set reads as a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_right_after_clear_or_invalidate_tag_hits() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cache: C = tagged("t").redis(connect(&server).await).build().unwrap();
    let other: C = tagged("t").redis(connect(&server).await).build().unwrap();
    let mut missed = Vec::new();
    for round in 0..100_u64 {
        cache.clear().await.unwrap();
        cache.set(&1, format!("v{round}")).await.unwrap();
        if cache.get(&1).await.unwrap() != Some(format!("v{round}")) {
            let in_redis = raw_get(&server, &rkey(1)).await.is_some();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let later = cache.get(&1).await.unwrap().is_some();
            missed.push(format!(
                "round {round}: clear, set, get -> miss (in Redis: {in_redis}; a hit 20 ms later: {later})"
            ));
        }
        cache.invalidate_tag("group:2").await.unwrap();
        cache.set(&2, format!("v{round}")).await.unwrap();
        if cache.get(&2).await.unwrap() != Some(format!("v{round}")) {
            missed.push(format!("round {round}: invalidate_tag, set, get -> miss"));
        }
        if other.get(&2).await.unwrap() != Some(format!("v{round}")) {
            missed.push(format!(
                "round {round}: invalidate_tag, set, get on another instance -> miss"
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "{} of 300 reads right after a set missed; first: {:?}",
        missed.len(),
        &missed[..missed.len().min(4)]
    );
}

/// Same, on a cache with no tag function at all: `clear` works on it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_on_an_untagged_cache_misses_everything_everywhere() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    let plain = instance(&server, None).await; // no local tier reads: remote reads below
    for key in 0..20 {
        a.set(&key, format!("v{key}")).await.unwrap();
        assert!(b.get(&key).await.unwrap().is_some());
    }
    a.clear().await.unwrap();
    for key in 0..20 {
        assert_eq!(a.get(&key).await.unwrap(), None, "a, key {key}");
    }
    within(SOON, "b misses everything", async || {
        let mut all = true;
        for key in 0..20 {
            all &= b.get(&key).await.unwrap().is_none();
        }
        all
    })
    .await;
    within(
        Duration::from_millis(1_500),
        "a plain instance misses everything",
        async || {
            let mut all = true;
            for key in 0..20 {
                all &= plain.get(&key).await.unwrap().is_none();
            }
            all
        },
    )
    .await;
    // Hits again once set.
    a.set(&3, "again".to_owned()).await.unwrap();
    assert_eq!(b.get(&3).await.unwrap().as_deref(), Some("again"));
}

/// `clear` racing with sets: sets that finished before the clear began miss after it; sets
/// that began after the clear returned hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_racing_with_sets_orders_by_time() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, Some(backplane(&server.url()))).await;
    let b = instance(&server, Some(backplane(&server.url()))).await;
    for round in 0..10_u64 {
        let base = round * 1_000;
        for key in base..base + 50 {
            a.set(&key, "before".to_owned()).await.unwrap();
            let _ = b.get(&key).await.unwrap();
        }
        // Concurrent sets of other keys while clearing.
        let racing = tokio::spawn({
            let a = a.clone();
            async move {
                for key in base + 100..base + 150 {
                    a.set(&key, "racing".to_owned()).await.unwrap();
                }
            }
        });
        b.clear().await.unwrap();
        // (A set in the same millisecond as the clear is the subject of
        // `set_right_after_clear_or_invalidate_tag_hits`; here only the ordering.)
        tokio::time::sleep(Duration::from_millis(3)).await;
        for key in base + 200..base + 250 {
            a.set(&key, "after".to_owned()).await.unwrap();
        }
        racing.await.unwrap();
        for key in base..base + 50 {
            assert_eq!(a.get(&key).await.unwrap(), None, "round {round}: a {key}");
            within(
                SOON,
                &format!("round {round}: b misses {key}"),
                async || b.get(&key).await.unwrap().is_none(),
            )
            .await;
        }
        for key in base + 200..base + 250 {
            assert_eq!(
                a.get(&key).await.unwrap().as_deref(),
                Some("after"),
                "round {round}: a {key}"
            );
            within(SOON, &format!("round {round}: b hits {key}"), async || {
                b.get(&key).await.unwrap().as_deref() == Some("after")
            })
            .await;
        }
    }
}

/// Boundaries: 32 tags of 256 bytes are accepted; 33, or one of 257, or an empty one, are
/// refused; a batch with refused tags for some keys still answers them and stores the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_limits_hold_exactly_and_in_batches() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let long = |i: usize| format!("{i:03}{}", "x".repeat(253));
    let cache: C = Cache::builder("t")
        .redis(connect(&server).await)
        .tags(move |id: &u64, _: Option<&String>| match id {
            1 => (0..32).map(long).collect(),
            2 => (0..33).map(long).collect(),
            3 => vec![format!("{}y", long(0))],
            4 => vec!["ok".to_owned(), String::new()],
            5 => panic!("tag function panics"),
            _ => vec!["ok".to_owned()],
        })
        .build()
        .unwrap();
    assert_eq!(long(31).len(), 256);
    cache.set(&1, "v".to_owned()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v"));
    for key in [2, 3, 4, 5] {
        let refused = cache.set(&key, "v".to_owned()).await;
        assert!(matches!(refused, Err(Error::Tag(_))), "{key}: {refused:?}");
    }
    let keys: Vec<u64> = (1..=8).collect();
    let got = cache
        .get_or_load_many(&keys, async |missing: Vec<u64>| {
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|k| (k, "loaded".to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
        })
        .await;
    for (key, result) in keys.iter().zip(&got) {
        let value = result.as_ref().unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(value.is_some(), "{key} answered");
    }
    eventually("the good ones stored", async || {
        raw_get(&server, &rkey(8)).await.is_some()
    })
    .await;
    for key in [2, 3, 4, 5] {
        assert_eq!(
            raw_get(&server, &rkey(key)).await,
            None,
            "{key} kept out of Redis"
        );
    }
    for key in [6, 7] {
        assert!(raw_get(&server, &rkey(key)).await.is_some(), "{key} stored");
    }
    // The longest tag invalidates.
    cache.invalidate_tag(&long(31)).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None);
    assert_eq!(cache.get(&6).await.unwrap().as_deref(), Some("loaded"));
}

/// Many distinct tags (50,000 invalidated): still correct, and the tag times in Redis go
/// with the entries' lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_tags_stay_correct_and_their_times_expire() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cache: C = Cache::builder("t")
        .redis(connect(&server).await)
        .ttl(Duration::from_secs(3))
        .local(LocalTier::entries(10_000))
        .tags(|id: &u64, _: Option<&String>| vec![format!("t{id}")])
        .build()
        .unwrap();
    for key in 0..1_000_u64 {
        cache.set(&key, "v".to_owned()).await.unwrap();
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..32_u64 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut tag = worker;
            while tag < 50_000 {
                // Every even key's tag, and many that no entry has.
                if tag >= 1_000 || tag % 2 == 0 {
                    cache.invalidate_tag(&format!("t{tag}")).await.unwrap();
                }
                tag += 32;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    for key in 0..1_000_u64 {
        let got = cache.get(&key).await.unwrap();
        assert_eq!(got.is_some(), key % 2 == 1, "key {key}");
    }
    within(
        Duration::from_secs(5),
        "the tag times expire from Redis",
        async || {
            let redis::Value::Array(keys) = raw(&server, &["KEYS", "{brisk:t:1:}tag:*"]).await
            else {
                panic!("KEYS answered something else")
            };
            keys.is_empty()
        },
    )
    .await;
}

/// A load under way on b while a invalidates the tag (both with local tiers and a
/// backplane): its callers get its value, but neither tier serves it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_under_way_during_invalidate_tag_stores_misses() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let build = async || -> C {
        let cache = tagged("t")
            .redis(connect(&server).await)
            .local(LocalTier::entries(1_000))
            .invalidation(backplane(&server.url()))
            .build()
            .unwrap();
        within(Duration::from_secs(3), "listening", async || {
            cache.is_listening()
        })
        .await;
        cache
    };
    let (a, b) = (build().await, build().await);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let keys: Vec<u64> = (0..20).collect();
    let batch = tokio::spawn({
        let (b, keys) = (b.clone(), keys.clone());
        async move {
            b.get_or_load_many(&keys, async move |missing: Vec<u64>| {
                let _ = released.await;
                Ok::<_, std::io::Error>(
                    missing
                        .into_iter()
                        .map(|k| (k, "before".to_owned()))
                        .collect::<HashMap<_, _>>(),
                )
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    a.invalidate_tag("group:3").await.unwrap();
    // Let b hear of it (the message is sent off a's path) before its batch ends.
    tokio::time::sleep(Duration::from_millis(30)).await;
    release.send(()).unwrap();
    let got = batch.await.unwrap();
    assert!(
        got.iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("before"))
    );
    // Docs: a load under way when its tag was invalidated *stores* a value that is a miss;
    // the batch's other keys (other tags) are plain loads and are stored too.
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for key in &keys {
            if raw_get(&server, &rkey(*key)).await.is_none() {
                missing.push(*key);
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the batch's values are stored in Redis; missing after 1 s: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    for cache in [&a, &b] {
        for key in &keys {
            let got = cache.get(key).await.unwrap();
            assert_eq!(got.is_none(), key % 10 == 3, "key {key}: {got:?}");
        }
    }
}

/// Tracking hears another instance's `clear`: the local tier is emptied though nothing was
/// published and no entry changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_hears_another_instances_clear() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a: C = tagged("t").redis(connect(&server).await).build().unwrap();
    let b: C = tagged("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .invalidation(tracking(&server.url()))
        .build()
        .unwrap();
    within(Duration::from_secs(3), "listening", async || {
        b.is_listening()
    })
    .await;
    for key in 0..10 {
        a.set(&key, "v".to_owned()).await.unwrap();
    }
    eventually("b holds them locally", async || {
        let before = reads(&server).await;
        let mut all = true;
        for key in 0..10 {
            all &= b.get(&key).await.unwrap().is_some();
        }
        all && reads(&server).await == before
    })
    .await;
    a.clear().await.unwrap();
    within(SOON, "b misses everything after a's clear", async || {
        let mut all = true;
        for key in 0..10 {
            all &= b.get(&key).await.unwrap().is_none();
        }
        all
    })
    .await;
}

/// Without an invalidation connection, another instance's tag invalidation reaches a local
/// tier after its local TTL (plus the second the tag time is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_invalidation_a_short_local_ttl_bounds_a_tag_invalidation() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a: C = tagged("t").redis(connect(&server).await).build().unwrap();
    let b: C = tagged("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100).ttl(Duration::from_millis(200)))
        .build()
        .unwrap();
    for key in 0..10 {
        a.set(&key, "v".to_owned()).await.unwrap();
        assert!(b.get(&key).await.unwrap().is_some());
    }
    a.invalidate_tag("group:4").await.unwrap();
    let started = Instant::now();
    within(
        Duration::from_millis(1_500),
        "b misses the tag's entry",
        async || b.get(&4).await.unwrap().is_none(),
    )
    .await;
    let _ = started;
    assert!(b.get(&5).await.unwrap().is_some());
}

// ---------------------------------------------------------------- cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_batches_tags_clear_and_set_again() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let urls = cluster.urls();
    let on_node = async |node: usize| -> C {
        let cache = tagged("c")
            .redis(client.get_async_connection().await.unwrap())
            .local(LocalTier::entries(1_000))
            .invalidation(backplane(&urls[node]))
            .build()
            .unwrap();
        within(Duration::from_secs(3), "listening", async || {
            cache.is_listening()
        })
        .await;
        cache
    };
    let (a, b) = (on_node(0).await, on_node(2).await);
    let keys: Vec<u64> = (0..60).collect();
    let load = |value: &'static str| {
        async move |missing: Vec<u64>| {
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|k| (k, value.to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
        }
    };
    let got = a.get_or_load_many(&keys, load("a")).await;
    assert!(
        got.iter()
            .all(|r| r.as_ref().unwrap().as_deref() == Some("a"))
    );
    eventually("b reads every key of a's batch from Redis", async || {
        let mut all = true;
        for key in &keys {
            all &= b.get(key).await.unwrap().as_deref() == Some("a");
        }
        all
    })
    .await;
    b.invalidate_tag("group:7").await.unwrap();
    within(SOON, "a misses group 7", async || {
        let mut ok = true;
        for key in &keys {
            ok &= a.get(key).await.unwrap().is_none() == (key % 10 == 7);
        }
        ok
    })
    .await;
    a.clear().await.unwrap();
    a.set(&17, "again".to_owned()).await.unwrap();
    let wrong = async |cache: &C| {
        let mut wrong = Vec::new();
        for key in &keys {
            let got = cache.get(key).await.unwrap();
            let right = if *key == 17 {
                got.as_deref() == Some("again")
            } else {
                got.is_none()
            };
            if !right {
                wrong.push((*key, got));
            }
        }
        wrong
    };
    assert_eq!(wrong(&a).await, [], "after clear and a set again, on a");
    let started = Instant::now();
    loop {
        let wrong = wrong(&b).await;
        if wrong.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < SOON,
            "after clear and a set again, b is wrong about (key, value): {wrong:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `invalidate_tag` and `clear` while Redis is down: `Error::Remote`, and this instance still
/// misses the tag's entries (its local tier emptied at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tag_while_redis_is_down_still_misses_here() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cache: C = tagged("t")
        .redis(connect(&server).await)
        .local(LocalTier::entries(100))
        .build()
        .unwrap();
    for key in 0..10 {
        cache.set(&key, format!("v{key}")).await.unwrap();
    }
    server = tokio::task::spawn_blocking(move || {
        server.kill().unwrap();
        server
    })
    .await
    .unwrap();
    let refused = cache.invalidate_tag("group:1").await;
    assert!(matches!(refused, Err(Error::Remote(_))), "{refused:?}");
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "the tag's entry misses here"
    );
    let refused = cache.clear().await;
    assert!(matches!(refused, Err(Error::Remote(_))), "{refused:?}");
    for key in 0..10 {
        assert_eq!(
            cache.get(&key).await.unwrap(),
            None,
            "key {key} after clear"
        );
    }
    drop(server);
}
