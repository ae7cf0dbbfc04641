//! A black-box review of leases, batched reads (`get_or_load_many` and the shared MGET of
//! concurrent `get`s) and early refresh, written from docs/caching.md and the rustdoc only.
//! Several `Cache` instances, each on its own connection, stand in for processes.
//!
//! Failing at the time of writing (genuine bugs):
//! - `a_list_under_one_key_of_a_batch_is_a_miss_for_that_key_only`: one foreign-typed key makes
//!   a batch reload (and overwrite) every key, cached ones included;
//! - `a_foreign_key_in_a_batch_does_not_unfence_its_other_keys`: ... and stores them unfenced:
//!   a value loaded before another instance's invalidation is stored after it;
//! - `concurrent_get_or_loads_of_many_keys_get_their_own_loaders_values`: two instances missing
//!   200 keys together load 20–60 % of them twice.

mod common;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_cache::{BreakerConfig, BuildError, Cache, CacheKey, Error, LocalTier};
use brisk_core::deadline;
use brisk_testkit::RedisServer;
use common::{connect, eventually, raw_get, raw_set, redis};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, timeout};

type R = Result<Option<String>, std::io::Error>;
type Batch = Result<HashMap<u64, String>, std::io::Error>;

/// Generous: a CI run shares the two cores.
const SLACK: Duration = Duration::from_millis(150);

fn rkey(name: &str, key: u64) -> String {
    format!("{{brisk:{name}:1:i:{key}}}")
}

fn lease(name: &str, key: u64) -> String {
    format!("{{brisk:{name}:1:i:{key}}}:lease")
}

async fn instance(
    server: &RedisServer,
    name: &str,
    local: bool,
    configure: impl Fn(common::Builder) -> common::Builder,
) -> Cache<u64, String> {
    let mut b = configure(Cache::builder(name)).redis(connect(server).await);
    if local {
        b = b.local(LocalTier::entries(1_000));
    }
    b.build().unwrap()
}

/// A gate loads wait on until `open`.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }
    fn open(&self) {
        self.0.add_permits(10_000);
    }
    async fn wait(&self) {
        let _ = self.0.acquire().await.unwrap();
    }
}

fn gated(
    gate: &Gate,
    runs: &Arc<AtomicUsize>,
    value: &str,
) -> impl Future<Output = R> + Send + 'static {
    let (gate, runs, value) = (gate.clone(), Arc::clone(runs), value.to_owned());
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        gate.wait().await;
        Ok(Some(value))
    }
}

fn counted(runs: &Arc<AtomicUsize>, value: &str) -> impl Future<Output = R> + Send + 'static {
    let (runs, value) = (Arc::clone(runs), value.to_owned());
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Some(value))
    }
}

const LOAD_MS: u64 = 30;

fn timed(
    runs: &Arc<AtomicUsize>,
    value: &str,
    took: Duration,
) -> impl Future<Output = R> + Send + 'static {
    let (runs, value) = (Arc::clone(runs), value.to_owned());
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        sleep(took).await;
        Ok(Some(value))
    }
}

fn ok(value: &str) -> impl Future<Output = R> + Send + 'static {
    let value = value.to_owned();
    async move { Ok(Some(value)) }
}

fn runs() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A batch loader answering `<prefix><key>` for every key, recording its calls.
#[derive(Clone, Default)]
struct Batches {
    calls: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Batches {
    fn load(
        &self,
        prefix: &str,
    ) -> impl FnOnce(Vec<u64>) -> std::future::Ready<Batch> + Send + 'static {
        let (calls, prefix) = (Arc::clone(&self.calls), prefix.to_owned());
        move |keys: Vec<u64>| {
            calls.lock().unwrap().push(keys.clone());
            std::future::ready(Ok(keys
                .into_iter()
                .map(|k| (k, format!("{prefix}{k}")))
                .collect()))
        }
    }
    fn gated(
        &self,
        gate: &Gate,
        prefix: &str,
    ) -> impl FnOnce(Vec<u64>) -> std::pin::Pin<Box<dyn Future<Output = Batch> + Send>> + Send + 'static
    {
        let (calls, prefix, gate) = (Arc::clone(&self.calls), prefix.to_owned(), gate.clone());
        move |keys: Vec<u64>| {
            calls.lock().unwrap().push(keys.clone());
            Box::pin(async move {
                gate.wait().await;
                Ok(keys
                    .into_iter()
                    .map(|k| (k, format!("{prefix}{k}")))
                    .collect())
            })
        }
    }
    fn calls(&self) -> Vec<Vec<u64>> {
        self.calls.lock().unwrap().clone()
    }
}

fn values(results: Vec<Result<Option<String>, Error>>) -> Vec<Option<String>> {
    results.into_iter().map(|r| r.unwrap()).collect()
}

async fn until_leased(server: &RedisServer, name: &str, key: u64) {
    eventually("the lease is taken", async || {
        raw_get(server, &lease(name, key)).await.is_some()
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

/// docs: "Every `set`, `invalidate` and `write_through`, in any process, ends the key's lease".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_from_another_instance_fences_a_load_in_progress() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "wt", true, |b| b).await;
    let b = instance(&server, "wt", true, |b| b).await;
    let c = instance(&server, "wt", false, |b| b).await;
    let gate = Gate::new();
    let n = runs();
    let slow = tokio::spawn({
        let (a, load) = (a.clone(), gated(&gate, &n, "old"));
        async move { a.get_or_load(&1, load).await }
    });
    until_leased(&server, "wt", 1).await;
    b.write_through(&1, "written".into(), async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    gate.open();
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("old"));
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        c.get(&1).await.unwrap().as_deref(),
        Some("written"),
        "Redis"
    );
    assert_eq!(
        a.get(&1).await.unwrap().as_deref(),
        Some("written"),
        "a's local tier"
    );
}

/// A holder whose load finds "none" caches the absence (negative TTL): a waiter in another
/// instance gets that absence instead of loading again ("load it once").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_gets_the_holders_absence_without_loading() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "abs", true, |b| b).await;
    let b = instance(&server, "abs", true, |b| b).await;
    let gate = Gate::new();
    let holder = tokio::spawn({
        let (a, gate) = (a.clone(), gate.clone());
        async move {
            a.get_or_load(&1, async move {
                gate.wait().await;
                Ok::<Option<String>, std::io::Error>(None)
            })
            .await
        }
    });
    until_leased(&server, "abs", 1).await;
    let n = runs();
    let waiter = tokio::spawn({
        let (b, load) = (b.clone(), counted(&n, "b"));
        async move { b.get_or_load(&1, load).await }
    });
    sleep(Duration::from_millis(30)).await;
    gate.open();
    assert_eq!(holder.await.unwrap().unwrap(), None);
    assert_eq!(waiter.await.unwrap().unwrap(), None, "the holder's absence");
    assert_eq!(n.load(Ordering::SeqCst), 0, "one load across the two");
}

/// docs: a waiting load's callers "wait as for any load — within their deadline".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instances_lease_keeps_its_deadline() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "dl", true, |b| b).await;
    let b = instance(&server, "dl", true, |b| b).await;
    let gate = Gate::new();
    let n = runs();
    let holder = tokio::spawn({
        let (a, load) = (a.clone(), gated(&gate, &n, "a"));
        async move { a.get_or_load(&1, load).await }
    });
    until_leased(&server, "dl", 1).await;
    let started = Instant::now();
    let got = deadline::scope(
        Instant::now() + Duration::from_millis(80),
        b.get_or_load(&1, ok("b")),
    )
    .await;
    let took = started.elapsed();
    assert!(matches!(got, Err(Error::Deadline(_))), "{got:?}");
    assert!(took < Duration::from_millis(80) + SLACK, "{took:?}");
    gate.open();
    assert_eq!(holder.await.unwrap().unwrap().as_deref(), Some("a"));
    // The wait went on without its caller: b now reads a's value.
    eventually("b reads a's value", async || {
        b.get(&1).await.unwrap().as_deref() == Some("a")
    })
    .await;
}

/// docs: "with a stale value at hand within the soft timeout" — a waiter on another process's
/// lease serves its stale value at the soft timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_with_a_stale_value_serves_it_at_the_soft_timeout() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| {
        b.ttl(Duration::from_millis(300))
            .stale_for(Duration::from_secs(20))
            .soft_timeout(Duration::from_millis(60))
    };
    let a = instance(&server, "soft", false, cfg).await;
    let b = instance(&server, "soft", false, cfg).await;
    a.get_or_load(&1, ok("v1")).await.unwrap();
    eventually("stored", async || {
        raw_get(&server, &rkey("soft", 1)).await.is_some()
    })
    .await;
    sleep(Duration::from_millis(350)).await;
    let gate = Gate::new();
    let n = runs();
    let holder = tokio::spawn({
        let (a, load) = (a.clone(), gated(&gate, &n, "v2"));
        async move { a.get_or_load(&1, load).await }
    });
    until_leased(&server, "soft", 1).await;
    let started = Instant::now();
    let got = b.get_or_load(&1, ok("b")).await;
    let took = started.elapsed();
    assert_eq!(got.unwrap().as_deref(), Some("v1"), "the stale value");
    assert!(took < Duration::from_millis(60) + SLACK, "{took:?}");
    gate.open();
    let _ = holder.await.unwrap();
}

/// docs: "a failed, panicked or timed-out load ... hands its lease back at once". The lease's
/// TTL here is `hard_timeout` + 2 × `remote_timeout` = 300 ms + 4 s: the waiter must not wait it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicked_and_timed_out_loads_hand_their_lease_back_at_once() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| {
        b.hard_timeout(Duration::from_millis(300))
            .remote_timeout(Duration::from_secs(2))
    };
    for (round, how) in ["panic", "timeout"].into_iter().enumerate() {
        let key = round as u64;
        let a = instance(&server, "hand", true, cfg).await;
        let b = instance(&server, "hand", true, cfg).await;
        let gate = Gate::new();
        let holder = tokio::spawn({
            let (a, gate) = (a.clone(), gate.clone());
            async move {
                a.get_or_load(&key, async move {
                    gate.wait().await;
                    if how == "panic" {
                        panic!("loader panics");
                    }
                    std::future::pending::<()>().await;
                    Ok::<Option<String>, std::io::Error>(None)
                })
                .await
            }
        });
        until_leased(&server, "hand", key).await;
        let started = Instant::now();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.get_or_load(&key, ok("b")).await }
        });
        sleep(Duration::from_millis(20)).await;
        gate.open();
        assert!(holder.await.unwrap().is_err(), "{how}");
        assert_eq!(
            waiter.await.unwrap().unwrap().as_deref(),
            Some("b"),
            "{how}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1),
            "{how}: waited {:?} (the lease's TTL is 4.3 s)",
            started.elapsed()
        );
    }
}

/// Hostile: another program left a value without TTL under the lease key. A load must still
/// end (the hard timeout bounds every load), never hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_lease_key_without_ttl_never_hangs_a_load() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    raw_set(&server, &lease("junk", 1), b"not a token").await;
    server.command(&["RPUSH", &lease("junk", 2), "a"]).unwrap();
    let a = instance(&server, "junk", true, |b| {
        b.hard_timeout(Duration::from_millis(300))
    })
    .await;
    for key in [1, 2] {
        let got = timeout(Duration::from_secs(3), a.get_or_load(&key, ok("v"))).await;
        assert!(got.is_ok(), "key {key}: hung");
    }
}

/// docs: "Redis failing while taking a lease: the load runs and stores as without leases".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_a_load_runs_unfenced_and_fast() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "pz", true, |b| {
        b.remote_timeout(Duration::from_millis(50))
    })
    .await;
    server.pause().unwrap();
    let n = runs();
    let started = Instant::now();
    let got = a.get_or_load(&1, counted(&n, "v")).await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert_eq!(got.unwrap().as_deref(), Some("v"));
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert!(took < Duration::from_millis(150) + SLACK, "{took:?}");
}

/// docs: "The scripts run by `EVALSHA`, loaded again after a restart": leases, fenced stores and
/// batch writes work after the server restarts with an empty script cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_fenced_stores_and_batches_land_again() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "rs", false, |b| b).await;
    a.get_or_load(&1, ok("before")).await.unwrap();
    a.get_or_load_many(&[10, 11], Batches::default().load("b"))
        .await;
    eventually("stored", async || {
        raw_get(&server, &rkey("rs", 11)).await.is_some()
    })
    .await;
    server.restart().unwrap();
    eventually("a load stores again", async || {
        let _ = a.get_or_load(&2, ok("after")).await;
        raw_get(&server, &rkey("rs", 2)).await.is_some()
    })
    .await;
    let got = values(
        a.get_or_load_many(&[20, 21], Batches::default().load("m"))
            .await,
    );
    assert_eq!(got, [Some("m20".into()), Some("m21".into())]);
    eventually("a batch stores again", async || {
        raw_get(&server, &rkey("rs", 21)).await.is_some()
    })
    .await;
    // Concurrent gets after the restart read the right keys.
    let mut set = tokio::task::JoinSet::new();
    for k in [2_u64, 20, 21, 1] {
        let a = a.clone();
        set.spawn(async move { (k, a.get(&k).await.unwrap()) });
    }
    while let Some(r) = set.join_next().await {
        let (k, v) = r.unwrap();
        let expected = match k {
            2 => Some("after".to_owned()),
            20 | 21 => Some(format!("m{k}")),
            _ => None,
        };
        assert_eq!(v, expected, "key {k}");
    }
}

// ---------------------------------------------------------------------------------------------
// get_or_load_many
// ---------------------------------------------------------------------------------------------

/// docs: "a failed, panicked or timed-out load ... hands its lease back at once" — a batch's
/// leases too, so another instance waiting on one of its keys loads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_panicked_or_timed_out_batch_hands_its_leases_back_at_once() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| {
        b.hard_timeout(Duration::from_millis(300))
            .remote_timeout(Duration::from_secs(2))
    };
    for (round, how) in ["error", "panic", "timeout"].into_iter().enumerate() {
        let keys = [round as u64 * 10, round as u64 * 10 + 1];
        let a = instance(&server, "bh", true, cfg).await;
        let b = instance(&server, "bh", true, cfg).await;
        let gate = Gate::new();
        let batch = tokio::spawn({
            let (a, gate) = (a.clone(), gate.clone());
            async move {
                a.get_or_load_many(&keys, move |_keys: Vec<u64>| async move {
                    gate.wait().await;
                    match how {
                        "error" => Err(common::io_error("db down")),
                        "panic" => panic!("batch panics"),
                        _ => {
                            std::future::pending::<()>().await;
                            Ok(HashMap::new())
                        }
                    }
                })
                .await
            }
        });
        until_leased(&server, "bh", keys[1]).await;
        let started = Instant::now();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.get_or_load(&keys[1], ok("b")).await }
        });
        sleep(Duration::from_millis(20)).await;
        gate.open();
        let results = batch.await.unwrap();
        assert!(results.iter().all(Result::is_err), "{how}: {results:?}");
        assert_eq!(
            waiter.await.unwrap().unwrap().as_deref(),
            Some("b"),
            "{how}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1),
            "{how}: waited {:?} (the lease's TTL is 4.3 s)",
            started.elapsed()
        );
        // And the error kinds are as documented.
        match how {
            "error" => assert!(matches!(results[0], Err(Error::Load(_))), "{results:?}"),
            "panic" => assert!(
                matches!(results[0], Err(Error::Panicked { .. })),
                "{results:?}"
            ),
            _ => assert!(
                matches!(results[0], Err(Error::LoadTimeout { .. })),
                "{results:?}"
            ),
        }
    }
}

/// docs: "A key another process is loading is loaded here too, but stored only by that
/// process."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_does_not_store_a_key_another_instance_is_loading() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "other", true, |b| b).await;
    let b = instance(&server, "other", true, |b| b).await;
    let c = instance(&server, "other", false, |b| b).await;
    let gate = Gate::new();
    let n = runs();
    let holder = tokio::spawn({
        let (a, load) = (a.clone(), gated(&gate, &n, "a1"));
        async move { a.get_or_load(&1, load).await }
    });
    until_leased(&server, "other", 1).await;
    let batches = Batches::default();
    let got = timeout(
        Duration::from_secs(3),
        b.get_or_load_many(&[1, 2], batches.load("b")),
    )
    .await
    .expect("the batch does not wait on a's lease");
    assert_eq!(values(got), [Some("b1".into()), Some("b2".into())]);
    eventually("key 2 stored", async || {
        raw_get(&server, &rkey("other", 2)).await.is_some()
    })
    .await;
    sleep(Duration::from_millis(50)).await;
    assert_eq!(c.get(&1).await.unwrap(), None, "b stored nothing for key 1");
    gate.open();
    assert_eq!(holder.await.unwrap().unwrap().as_deref(), Some("a1"));
    eventually("a's value stored", async || {
        c.get(&1).await.unwrap().as_deref() == Some("a1")
    })
    .await;
}

/// docs: "keys already being loaded are joined rather than loaded twice".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_joins_a_single_load_in_progress_on_every_shape() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    for (shape, cache) in common::every_shape(&server, |b| b).await {
        let gate = Gate::new();
        let n = runs();
        let single = tokio::spawn({
            let (cache, load) = (cache.clone(), gated(&gate, &n, "single"));
            async move { cache.get_or_load(&1, load).await }
        });
        sleep(Duration::from_millis(30)).await;
        let batches = Batches::default();
        let batch = tokio::spawn({
            let (cache, load) = (cache.clone(), batches.load("v"));
            async move { cache.get_or_load_many(&[1, 2, 1], load).await }
        });
        sleep(Duration::from_millis(30)).await;
        gate.open();
        assert_eq!(
            single.await.unwrap().unwrap().as_deref(),
            Some("single"),
            "{shape}"
        );
        assert_eq!(
            values(batch.await.unwrap()),
            [
                Some("single".into()),
                Some("v2".into()),
                Some("single".into())
            ],
            "{shape}"
        );
        assert_eq!(
            batches.calls(),
            [vec![2]],
            "{shape}: only the key not in flight"
        );
    }
}

fn string_caches(
    server_redis: Option<&brisk_pool::redis_source::Multiplexed>,
) -> Vec<(&'static str, Cache<String, String>)> {
    let mut out = Vec::new();
    for local in [false, true] {
        // One name per shape: shapes sharing a Redis must not see each other's entries.
        let name = format!("long-{}-{local}", server_redis.is_some());
        let mut b = Cache::<String, String>::builder(&name).max_key_len(16);
        if let Some(r) = server_redis {
            b = b.redis(r.clone());
        }
        if local {
            b = b.local(LocalTier::entries(100));
        }
        out.push((if local { "local" } else { "no local" }, b.build().unwrap()));
    }
    out
}

/// docs: "[`Error::Key`] only that key's".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_long_fails_only_itself_in_a_batch() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let redis = connect(&server).await;
    let mut shapes = string_caches(None);
    shapes.extend(string_caches(Some(&redis)));
    for (shape, cache) in shapes {
        let long = "x".repeat(100);
        let keys = vec!["a".to_owned(), long.clone(), "b".to_owned(), long];
        let calls = Arc::new(Mutex::new(Vec::new()));
        let got = cache
            .get_or_load_many(&keys, {
                let calls = Arc::clone(&calls);
                move |missing: Vec<String>| async move {
                    calls.lock().unwrap().push(missing.clone());
                    Ok::<_, std::io::Error>(
                        missing
                            .into_iter()
                            .map(|k| (k.clone(), format!("v{k}")))
                            .collect::<HashMap<_, _>>(),
                    )
                }
            })
            .await;
        assert_eq!(got.len(), 4, "{shape}");
        assert_eq!(got[0].as_ref().unwrap().as_deref(), Some("va"), "{shape}");
        assert!(
            matches!(got[1], Err(Error::Key(_))),
            "{shape}: {:?}",
            got[1]
        );
        assert_eq!(got[2].as_ref().unwrap().as_deref(), Some("vb"), "{shape}");
        assert!(
            matches!(got[3], Err(Error::Key(_))),
            "{shape}: {:?}",
            got[3]
        );
        assert_eq!(
            *calls.lock().unwrap(),
            [vec!["a".to_owned(), "b".to_owned()]],
            "{shape}"
        );
        // Only refused keys: no load at all.
        let none = cache
            .get_or_load_many(&["y".repeat(50)], |_m: Vec<String>| async {
                panic!("loaded a refused key");
                #[allow(unreachable_code)]
                Ok::<HashMap<String, String>, std::io::Error>(HashMap::new())
            })
            .await;
        assert!(
            matches!(none[0], Err(Error::Key(_))),
            "{shape}: {:?}",
            none[0]
        );
    }
}

/// docs: "the load runs on its own task (a caller dropped does not stop it)" — the batch lands
/// in Redis and in the local tier, and a single read meanwhile joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_batch_caller_still_lands_the_batch() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "drop", true, |b| b).await;
    let c = instance(&server, "drop", false, |b| b).await;
    let gate = Gate::new();
    let batches = Batches::default();
    let fut = a.get_or_load_many(&[1, 2, 3], batches.gated(&gate, "v"));
    let _ = timeout(Duration::from_millis(50), fut).await;
    let n = runs();
    let joined = tokio::spawn({
        let (a, load) = (a.clone(), counted(&n, "single"));
        async move { a.get_or_load(&2, load).await }
    });
    sleep(Duration::from_millis(20)).await;
    gate.open();
    assert_eq!(
        joined.await.unwrap().unwrap().as_deref(),
        Some("v2"),
        "joined the batch"
    );
    assert_eq!(n.load(Ordering::SeqCst), 0);
    for k in [1, 2, 3] {
        eventually("the batch landed in Redis", async || {
            c.get(&k).await.unwrap() == Some(format!("v{k}"))
        })
        .await;
    }
    assert_eq!(batches.calls().len(), 1);
}

/// The same, dropped before the batch task even got its leases: right at the first poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_caller_dropped_at_any_point_leaves_the_keys_loadable() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "dropany", true, |b| b).await;
    for (i, after_us) in [0_u64, 100, 300, 1_000, 3_000].into_iter().enumerate() {
        let keys = [i as u64 * 10, i as u64 * 10 + 1];
        let fut = a.get_or_load_many(&keys, |keys: Vec<u64>| async move {
            sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(
                keys.into_iter()
                    .map(|k| (k, format!("v{k}")))
                    .collect::<HashMap<_, _>>(),
            )
        });
        let _ = timeout(Duration::from_micros(after_us), fut).await;
        let got = timeout(
            Duration::from_secs(3),
            a.get_or_load_many(&keys, Batches::default().load("v")),
        )
        .await
        .expect("not stuck");
        assert_eq!(
            values(got),
            keys.iter()
                .map(|k| Some(format!("v{k}")))
                .collect::<Vec<_>>(),
            "dropped after {after_us} µs"
        );
    }
}

/// docs: "a stale value within the stale window stands in for a failed load" — for a batch that
/// fails, panics or times out, on every shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_stands_in_for_a_failed_batch_on_every_shape() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let shapes = common::every_shape(&server, |b| {
        b.ttl(Duration::from_millis(200))
            .stale_for(Duration::from_secs(20))
            .hard_timeout(Duration::from_millis(200))
    })
    .await;
    for (shape, cache) in &shapes {
        let got = values(
            cache
                .get_or_load_many(&[1, 2], Batches::default().load("v"))
                .await,
        );
        assert_eq!(got, [Some("v1".into()), Some("v2".into())], "{shape}");
    }
    sleep(Duration::from_millis(300)).await;
    for (shape, cache) in &shapes {
        for how in ["error", "panic", "timeout"] {
            let got = cache
                .get_or_load_many(&[1, 3, 2], move |_keys: Vec<u64>| async move {
                    match how {
                        "error" => Err(common::io_error("db down")),
                        "panic" => panic!("batch panics"),
                        _ => {
                            std::future::pending::<()>().await;
                            Ok(HashMap::new())
                        }
                    }
                })
                .await;
            assert_eq!(
                got[0].as_ref().ok().cloned().flatten().as_deref(),
                Some("v1"),
                "{shape} {how}: {got:?}"
            );
            assert!(got[1].is_err(), "{shape} {how}: {got:?}");
            assert_eq!(
                got[2].as_ref().ok().cloned().flatten().as_deref(),
                Some("v2"),
                "{shape} {how}: {got:?}"
            );
        }
    }
}

/// docs: `set` and `invalidate` "win over a load in progress: it still answers its waiters, but
/// stores nothing" — a batch's key too, on every shape, from the same instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_batch_on_the_same_instance_wins_on_every_shape() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    for (shape, cache) in common::every_shape(&server, |b| b).await {
        let gate = Gate::new();
        let batches = Batches::default();
        let batch = tokio::spawn({
            let (cache, load) = (cache.clone(), batches.gated(&gate, "old"));
            async move { cache.get_or_load_many(&[1, 2, 3], load).await }
        });
        sleep(Duration::from_millis(40)).await;
        cache.invalidate(&2).await.unwrap();
        cache.set(&3, "set".into()).await.unwrap();
        gate.open();
        let got = values(batch.await.unwrap());
        assert_eq!(got[0].as_deref(), Some("old1"), "{shape}");
        sleep(Duration::from_millis(100)).await;
        assert_eq!(
            cache.get(&1).await.unwrap().as_deref(),
            Some("old1"),
            "{shape}"
        );
        assert_eq!(
            cache.get(&2).await.unwrap(),
            None,
            "{shape}: the invalidation won"
        );
        assert_eq!(
            cache.get(&3).await.unwrap().as_deref(),
            Some("set"),
            "{shape}: the set won"
        );
    }
}

/// docs: values read from Redis "that are not this cache's ... are a miss ... and the next load
/// overwrites them": a list under one key of a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_under_one_key_of_a_batch_is_a_miss_for_that_key_only() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "lst", false, |b| b).await;
    a.set(&1, "one".into()).await.unwrap();
    a.set(&3, "three".into()).await.unwrap();
    server
        .command(&["RPUSH", &rkey("lst", 2), "x", "y"])
        .unwrap();
    let batches = Batches::default();
    let got = values(a.get_or_load_many(&[1, 2, 3], batches.load("v")).await);
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (batches.calls(), got, a.get(&1).await.unwrap()),
        (
            vec![vec![2]],
            vec![Some("one".into()), Some("v2".into()), Some("three".into())],
            Some("one".into())
        ),
        "(batch calls, results, key 1 afterwards): only the foreign key is loaded, cached ones are kept"
    );
    eventually("overwritten", async || {
        server
            .command(&["TYPE", &rkey("lst", 2)])
            .unwrap()
            .contains("string")
    })
    .await;
}

#[derive(Clone, Debug)]
struct Touchy {
    id: u64,
    panics: bool,
}
impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        assert!(!self.panics && !other.panics, "eq panicked");
        self.id == other.id
    }
}
impl Eq for Touchy {}
impl Hash for Touchy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        assert!(!self.panics, "hash panicked");
        self.id.hash(state);
    }
}
impl CacheKey for Touchy {
    fn encode(&self, out: &mut Vec<u8>) {
        self.id.encode(out);
    }
}

/// A key whose `Hash` panics in a batch may fail that call, but must not break the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_hash_panics_in_a_batch_does_not_break_the_cache() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    for remote in [false, true] {
        let mut b = Cache::<Touchy, String>::builder("touchy").local(LocalTier::entries(10));
        if remote {
            b = b.redis(connect(&server).await);
        }
        let cache = b.build().unwrap();
        let keys = vec![
            Touchy {
                id: 1,
                panics: false,
            },
            Touchy {
                id: 2,
                panics: true,
            },
        ];
        let _ = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load_many(&keys, |ks: Vec<Touchy>| async move {
                        Ok::<_, std::io::Error>(
                            ks.into_iter()
                                .map(|k| {
                                    (
                                        Touchy {
                                            id: k.id,
                                            panics: false,
                                        },
                                        "v".to_owned(),
                                    )
                                })
                                .collect::<HashMap<_, _>>(),
                        )
                    })
                    .await
            }
        })
        .await;
        let good = Touchy {
            id: 1,
            panics: false,
        };
        let got = timeout(Duration::from_secs(2), cache.get_or_load(&good, ok("fine"))).await;
        assert!(got.expect("not stuck").is_ok(), "remote {remote}");
        let got = timeout(
            Duration::from_secs(2),
            cache.get_or_load_many(
                &[Touchy {
                    id: 3,
                    panics: false,
                }],
                |ks: Vec<Touchy>| async move {
                    Ok::<_, std::io::Error>(
                        ks.into_iter()
                            .map(|k| (k, "three".to_owned()))
                            .collect::<HashMap<_, _>>(),
                    )
                },
            ),
        )
        .await
        .expect("not stuck");
        assert_eq!(
            got[0].as_ref().unwrap().as_deref(),
            Some("three"),
            "remote {remote}"
        );
    }
}

/// Hostile batch loader: it answers keys it was not asked for. Results stay per key asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_loader_answering_extra_keys_does_not_confuse_results() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    for (shape, cache) in common::every_shape(&server, |b| b).await {
        cache.set(&5, "five".into()).await.unwrap();
        let got = values(
            cache
                .get_or_load_many(&[1, 5], |_keys: Vec<u64>| async {
                    Ok::<_, std::io::Error>(HashMap::from([
                        (1, "one".to_owned()),
                        (5, "bogus".to_owned()),
                        (9, "nine".to_owned()),
                    ]))
                })
                .await,
        );
        assert_eq!(got, [Some("one".into()), Some("five".into())], "{shape}");
        sleep(Duration::from_millis(50)).await;
        assert_eq!(
            cache.get(&5).await.unwrap().as_deref(),
            Some("five"),
            "{shape}: a key not asked for is not overwritten"
        );
    }
}

/// On a cluster: a batch over every slot range, fenced per key by another instance's
/// invalidations; a dropped caller's batch lands on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_batch_is_fenced_per_key_and_lands_when_dropped() {
    let cluster = tokio::task::spawn_blocking(brisk_testkit::RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let on_cluster = async |local: bool| -> Cache<u64, String> {
        let mut b = Cache::builder("cb").redis(client.get_async_connection().await.unwrap());
        if local {
            b = b.local(LocalTier::entries(1_000));
        }
        b.build().unwrap()
    };
    let (a, b, c) = (
        on_cluster(true).await,
        on_cluster(true).await,
        on_cluster(false).await,
    );
    let keys: Vec<u64> = (0..30).collect();
    let gate = Gate::new();
    let batches = Batches::default();
    let batch = tokio::spawn({
        let (a, keys, load) = (a.clone(), keys.clone(), batches.gated(&gate, "old"));
        async move { a.get_or_load_many(&keys, load).await }
    });
    sleep(Duration::from_millis(100)).await;
    for k in (0..30).step_by(3) {
        b.invalidate(&k).await.unwrap();
    }
    gate.open();
    let got = values(batch.await.unwrap());
    assert_eq!(
        got,
        keys.iter()
            .map(|k| Some(format!("old{k}")))
            .collect::<Vec<_>>()
    );
    for k in 0..30_u64 {
        let expected = if k % 3 == 0 {
            None
        } else {
            Some(format!("old{k}"))
        };
        eventually("per key: stored or fenced", async || {
            c.get(&k).await.unwrap() == expected
        })
        .await;
    }
    sleep(Duration::from_millis(100)).await;
    for k in (0..30).step_by(3) {
        assert_eq!(c.get(&k).await.unwrap(), None, "key {k} fenced");
        assert_eq!(
            a.get(&k).await.unwrap(),
            None,
            "key {k} not in a's local tier"
        );
    }
    // Dropped caller.
    let keys: Vec<u64> = (100..130).collect();
    let gate = Gate::new();
    let fut = a.get_or_load_many(&keys, Batches::default().gated(&gate, "d"));
    let _ = timeout(Duration::from_millis(50), fut).await;
    gate.open();
    for &k in &keys {
        eventually("the dropped batch landed", async || {
            c.get(&k).await.unwrap() == Some(format!("d{k}"))
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Early refresh
// ---------------------------------------------------------------------------------------------

#[test]
fn early_refresh_beta_bounds() {
    for beta in [
        -0.0,
        f64::NEG_INFINITY,
        100.000_001,
        -f64::MIN_POSITIVE,
        f64::MAX,
    ] {
        let built = Cache::<u64, String>::builder("b")
            .early_refresh(beta)
            .build();
        assert!(matches!(built, Err(BuildError::EarlyRefresh(_))), "{beta}");
    }
    for beta in [100.0, f64::MIN_POSITIVE, 1e-9] {
        assert!(
            Cache::<u64, String>::builder("b")
                .early_refresh(beta)
                .build()
                .is_ok(),
            "{beta}"
        );
    }
}

/// A loader that takes `first` the first time and `later` afterwards, answering `v<run>`.
fn timed_load(
    runs: &Arc<AtomicUsize>,
    first: Duration,
    later: Duration,
) -> impl Future<Output = R> + Send + 'static {
    let runs = Arc::clone(runs);
    async move {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        sleep(if run == 1 { first } else { later }).await;
        Ok(Some(format!("v{run}")))
    }
}

/// docs: "One refresh runs per key in a process (single-flight), and over Redis one across
/// processes"; "no caller waits for the refresh". beta 100 and a 100 ms load: every read
/// 3 s before expiry draws with p ≈ 0.74.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_early_refresh_across_instances_and_no_caller_waits() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| b.ttl(Duration::from_secs(3)).early_refresh(100.0);
    let a = instance(&server, "er", true, cfg).await;
    let b = instance(&server, "er", true, cfg).await;
    let n = runs();
    let first = a
        .get_or_load(
            &1,
            timed_load(&n, Duration::from_millis(100), Duration::from_millis(400)),
        )
        .await;
    assert_eq!(first.unwrap().as_deref(), Some("v1"));
    eventually("stored", async || {
        raw_get(&server, &rkey("er", 1)).await.is_some()
    })
    .await;
    // b fills its local tier from Redis (the envelope carries the load's duration).
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(200) {
        for cache in [&a, &b] {
            let t = Instant::now();
            let got = cache
                .get_or_load(
                    &1,
                    timed_load(&n, Duration::from_millis(400), Duration::from_millis(400)),
                )
                .await
                .unwrap();
            slowest = slowest.max(t.elapsed());
            assert_eq!(
                got.as_deref(),
                Some("v1"),
                "the cached value while the refresh runs"
            );
        }
        sleep(Duration::from_millis(5)).await;
    }
    assert!(
        slowest < Duration::from_millis(50),
        "a caller waited {slowest:?}"
    );
    sleep(Duration::from_millis(400)).await;
    assert_eq!(
        n.load(Ordering::SeqCst),
        2,
        "the first load and one refresh, across the two"
    );
}

/// docs: "Values given by `set` took nothing to load and are never refreshed early" — nor in
/// another instance that reads them from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_given_by_set_are_never_refreshed_early_in_any_instance() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| b.ttl(Duration::from_millis(1_200)).early_refresh(100.0);
    let a = instance(&server, "es", true, cfg).await;
    let b = instance(&server, "es", true, cfg).await;
    let c = instance(&server, "es", false, cfg).await;
    a.set(&1, "set".into()).await.unwrap();
    a.write_through(&2, "wt".into(), async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    let n = runs();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        for cache in [&a, &b, &c] {
            for k in [1, 2] {
                let got = cache.get_or_load(&k, counted(&n, "loaded")).await.unwrap();
                assert!(got.is_some());
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_millis(50)).await;
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "no early refresh of set values"
    );
}

/// Starts an early refresh of key 1 on `cache` with a gated loader; returns once it runs.
async fn start_refresh(cache: &Cache<u64, String>, gate: &Gate, n: &Arc<AtomicUsize>, value: &str) {
    let before = n.load(Ordering::SeqCst);
    for _ in 0..200 {
        let got = cache.get_or_load(&1, gated(gate, n, value)).await.unwrap();
        assert!(got.is_some());
        if n.load(Ordering::SeqCst) > before {
            return;
        }
        sleep(Duration::from_millis(5)).await;
    }
    panic!("no early refresh started");
}

/// docs: an invalidation "in any process" ends the lease, so "a load that began before an
/// invalidation never stores its value after it" — a background refresh included. Here the
/// invalidation comes from the same instance, then from another one, then a `set`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_background_refresh_wins() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| b.ttl(Duration::from_secs(5)).early_refresh(100.0);
    for how in [
        "same invalidate",
        "other invalidate",
        "other set",
        "same set",
    ] {
        let name = format!("ei{}", how.len() + how.as_bytes()[0] as usize);
        let a = instance(&server, &name, true, cfg).await;
        let b = instance(&server, &name, true, cfg).await;
        let c = instance(&server, &name, false, cfg).await;
        let n = runs();
        a.get_or_load(
            &1,
            timed_load(&n, Duration::from_millis(100), Duration::ZERO),
        )
        .await
        .unwrap();
        eventually("stored", async || {
            raw_get(&server, &rkey(&name, 1)).await.is_some()
        })
        .await;
        let gate = Gate::new();
        start_refresh(&a, &gate, &n, "refreshed").await;
        until_leased(&server, &name, 1).await;
        match how {
            "same invalidate" => a.invalidate(&1).await.unwrap(),
            "other invalidate" => b.invalidate(&1).await.unwrap(),
            "other set" => b.set(&1, "set".into()).await.unwrap(),
            _ => a.set(&1, "set".into()).await.unwrap(),
        }
        gate.open();
        sleep(Duration::from_millis(200)).await;
        let expected = if how.ends_with("set") {
            Some("set".to_owned())
        } else {
            None
        };
        assert_eq!(c.get(&1).await.unwrap(), expected, "{how}: Redis");
        if how != "other invalidate" {
            // (a's local tier cannot see another process's invalidation before its local TTL.)
            assert_eq!(a.get(&1).await.unwrap(), expected, "{how}: a's local tier");
        }
    }
}

/// After a same-instance invalidation, a reader asks after the invalidation finished: it must
/// not be given what the refresh that began before it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_after_an_invalidation_does_not_join_the_refresh_that_began_before_it() {
    let cfg = |b: common::Builder| b.ttl(Duration::from_secs(5)).early_refresh(100.0);
    for local in [false, true] {
        let mut builder = cfg(Cache::builder("rj"));
        if local {
            builder = builder.local(LocalTier::entries(10));
        }
        let a: Cache<u64, String> = builder.build().unwrap();
        let n = runs();
        a.get_or_load(
            &1,
            timed_load(&n, Duration::from_millis(100), Duration::ZERO),
        )
        .await
        .unwrap();
        let gate = Gate::new();
        start_refresh(&a, &gate, &n, "old").await;
        a.invalidate(&1).await.unwrap();
        let reader = tokio::spawn({
            let a = a.clone();
            async move { a.get_or_load(&1, ok("new")).await }
        });
        sleep(Duration::from_millis(30)).await;
        gate.open();
        assert_eq!(
            reader.await.unwrap().unwrap().as_deref(),
            Some("new"),
            "local {local}"
        );
    }
}

/// docs: "Early refresh does not apply to batched reads."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_never_start_an_early_refresh() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| b.ttl(Duration::from_secs(5)).early_refresh(100.0);
    let a = instance(&server, "eb", true, cfg).await;
    let n = runs();
    a.get_or_load(
        &1,
        timed_load(&n, Duration::from_millis(100), Duration::ZERO),
    )
    .await
    .unwrap();
    let batches = Batches::default();
    for _ in 0..30 {
        let got = values(a.get_or_load_many(&[1], batches.load("b")).await);
        assert_eq!(got, [Some("v1".into())]);
    }
    sleep(Duration::from_millis(50)).await;
    assert!(batches.calls().is_empty(), "{:?}", batches.calls());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Concurrent gets sharing one MGET
// ---------------------------------------------------------------------------------------------

/// Many concurrent reads over several instances: each reader gets its own key's value, misses
/// are misses, and a list under one key is a miss for that key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_each_get_their_own_keys_value() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let writer = instance(&server, "mg", false, |b| b).await;
    for k in (0..300_u64).filter(|k| k % 3 != 0) {
        writer.set(&k, format!("v{k}")).await.unwrap();
    }
    for k in (0..300_u64).step_by(30) {
        let _ = server.command(&["DEL", &rkey("mg", k)]);
        server.command(&["RPUSH", &rkey("mg", k), "a"]).unwrap();
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(instance(&server, "mg", false, |b| b).await);
    }
    for round in 0..5 {
        let mut set = tokio::task::JoinSet::new();
        for (i, cache) in readers.iter().enumerate() {
            for k in 0..300_u64 {
                let cache = cache.clone();
                let k = (k + i as u64 * 7 + round) % 300;
                set.spawn(async move { (k, cache.get(&k).await) });
            }
        }
        while let Some(r) = set.join_next().await {
            let (k, got) = r.unwrap();
            let expected = (k % 3 != 0).then(|| format!("v{k}"));
            assert_eq!(got.unwrap(), expected, "round {round} key {k}");
        }
    }
}

/// docs: "Four processes missing one key together run its loader once in all" — here two
/// instances, two callers each, missing 200 keys together (loads of 30 ms): each key must be
/// loaded once across the two, with its own loader's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_get_or_loads_of_many_keys_get_their_own_loaders_values() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    // 100 keys pass; 150 and up load a third of the keys twice. A remote timeout of 2 s rules
    // out "Redis was too slow, so the loads went on unfenced".
    let keys: u64 = 200;
    let rt: u64 = 2_000;
    let a = instance(&server, "gl", true, |b| {
        b.remote_timeout(Duration::from_millis(rt))
    })
    .await;
    let b = instance(&server, "gl", true, |b| {
        b.remote_timeout(Duration::from_millis(rt))
    })
    .await;
    let n = runs();
    let mut set = tokio::task::JoinSet::new();
    let caches = [&a, &b];
    for k in 0..keys {
        for &cache in &caches {
            for _ in 0..2 {
                let (cache, load) = (
                    cache.clone(),
                    timed(&n, &format!("v{k}"), Duration::from_millis(LOAD_MS)),
                );
                set.spawn(async move { (k, cache.get_or_load(&k, load).await) });
            }
        }
    }
    while let Some(r) = set.join_next().await {
        let (k, got) = r.unwrap();
        assert_eq!(got.unwrap(), Some(format!("v{k}")), "key {k}");
    }
    assert_eq!(
        n.load(Ordering::SeqCst) as u64,
        keys,
        "each key loaded once across the two"
    );
}

/// docs: a paused Redis "waits at most `remote_timeout` — or the deadline"; a reader with a
/// short deadline that joins a shared read in flight returns at its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_joining_a_shared_read_returns_at_its_deadline() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "sd", false, |b| {
        b.remote_timeout(Duration::from_millis(800))
    })
    .await;
    server.pause().unwrap();
    let leader = tokio::spawn({
        let a = a.clone();
        async move { a.get(&1).await }
    });
    sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let got = deadline::scope(Instant::now() + Duration::from_millis(40), a.get(&2)).await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert!(
        took < Duration::from_millis(40) + SLACK,
        "took {took:?} for a 40 ms deadline"
    );
    let _ = leader.await;
}

/// The reverse: a reader without a deadline is not cut short because the reader whose read it
/// shares had a short deadline, or was dropped. Redis is only slow (paused 100 ms), within the
/// remote timeout: the value is there and must be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_is_not_cut_short_by_the_deadline_or_drop_of_one_it_shares_a_read_with() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "sh", false, |b| {
        b.remote_timeout(Duration::from_millis(800))
    })
    .await;
    a.set(&1, "one".into()).await.unwrap();
    a.set(&2, "two".into()).await.unwrap();
    for how in ["deadline", "dropped"] {
        server.pause().unwrap();
        let short = tokio::spawn({
            let a = a.clone();
            async move {
                if how == "deadline" {
                    let _ = deadline::scope(Instant::now() + Duration::from_millis(20), a.get(&1))
                        .await;
                } else {
                    let _ = timeout(Duration::from_millis(20), a.get(&1)).await;
                }
            }
        });
        sleep(Duration::from_millis(3)).await;
        let patient = tokio::spawn({
            let a = a.clone();
            async move { a.get(&2).await }
        });
        sleep(Duration::from_millis(100)).await;
        server.resume().unwrap();
        short.await.unwrap();
        assert_eq!(
            patient.await.unwrap().unwrap().as_deref(),
            Some("two"),
            "{how}"
        );
    }
}

/// docs: "paused or slow: waits at most `remote_timeout`", and the breaker opens after its
/// failures in a row; concurrent readers on a paused Redis each return within the remote
/// timeout; once open, reads skip Redis; after `resume` and `open_for`, values are read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_on_a_paused_redis_are_bounded_and_the_breaker_recovers() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let rt = Duration::from_millis(100);
    let a = instance(&server, "br", false, |b| {
        b.remote_timeout(rt).breaker(BreakerConfig {
            failures: 3,
            open_for: Duration::from_millis(300),
        })
    })
    .await;
    for k in 0..50 {
        a.set(&k, format!("v{k}")).await.unwrap();
    }
    server.pause().unwrap();
    for wave in 0..3 {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..50_u64 {
            let a = a.clone();
            set.spawn(async move {
                let t = Instant::now();
                let got = a.get(&k).await;
                (got, t.elapsed())
            });
        }
        while let Some(r) = set.join_next().await {
            let (got, took) = r.unwrap();
            assert!(got.is_ok(), "wave {wave}: {got:?}");
            assert!(took < rt + SLACK, "wave {wave}: took {took:?}");
        }
    }
    // Open by now: fast.
    let t = Instant::now();
    assert!(a.get(&1).await.is_ok());
    assert!(
        t.elapsed() < Duration::from_millis(30),
        "open breaker: {:?}",
        t.elapsed()
    );
    server.resume().unwrap();
    eventually("values are read again", async || {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..50_u64 {
            let a = a.clone();
            set.spawn(async move { (k, a.get(&k).await.unwrap()) });
        }
        let mut all = true;
        while let Some(r) = set.join_next().await {
            let (k, got) = r.unwrap();
            if let Some(v) = &got {
                assert_eq!(*v, format!("v{k}"));
            } else {
                all = false;
            }
        }
        all
    })
    .await;
}

/// After a restart (an empty data set) concurrent reads are misses, the next loads refill, and
/// every reader gets its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_across_a_restart_stay_per_key() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "rr", false, |b| b).await;
    for k in 0..40 {
        a.set(&k, format!("old{k}")).await.unwrap();
    }
    server.restart().unwrap();
    eventually("every read is per key after the restart", async || {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..40_u64 {
            let a = a.clone();
            set.spawn(async move { (k, a.get_or_load(&k, ok(&format!("new{k}"))).await.unwrap()) });
        }
        let mut fine = true;
        while let Some(r) = set.join_next().await {
            let (k, got) = r.unwrap();
            assert_eq!(
                got,
                Some(format!("new{k}")),
                "key {k}: an old value after the restart"
            );
        }
        for k in 0..40_u64 {
            fine &= raw_get(&server, &rkey("rr", k)).await.is_some();
        }
        fine
    })
    .await;
}

/// docs: Redis paused or slow "waits at most `remote_timeout` ... then goes on as a miss" —
/// for a batch too: its read, leases and answer are bounded, and its values are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_paused_redis_is_answered_within_its_remote_timeouts() {
    let mut server = tokio::task::spawn_blocking(redis).await.unwrap();
    let rt = Duration::from_millis(80);
    let a = instance(&server, "bp", true, |b| b.remote_timeout(rt)).await;
    server.pause().unwrap();
    let started = Instant::now();
    let got = a
        .get_or_load_many(&[1, 2], Batches::default().load("v"))
        .await;
    let took = started.elapsed();
    server.resume().unwrap();
    assert_eq!(values(got), [Some("v1".into()), Some("v2".into())]);
    assert!(took < rt * 2 + SLACK, "took {took:?}");
}

/// docs: "Every wait is bounded by the request's deadline as well ... the load goes on for the
/// others and fills the cache" — for a batch's callers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_caller_gets_deadline_at_its_deadline_and_the_batch_lands() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "bd", true, |b| b).await;
    let c = instance(&server, "bd", false, |b| b).await;
    a.set(&1, "one".into()).await.unwrap();
    let started = Instant::now();
    let got = deadline::scope(
        Instant::now() + Duration::from_millis(60),
        a.get_or_load_many(&[1, 2], |keys: Vec<u64>| async move {
            sleep(Duration::from_millis(300)).await;
            Ok::<_, std::io::Error>(
                keys.into_iter()
                    .map(|k| (k, format!("v{k}")))
                    .collect::<HashMap<_, _>>(),
            )
        }),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(got[0].as_ref().unwrap().as_deref(), Some("one"));
    assert!(matches!(got[1], Err(Error::Deadline(_))), "{:?}", got[1]);
    assert!(took < Duration::from_millis(60) + SLACK, "took {took:?}");
    eventually("the batch landed", async || {
        c.get(&2).await.unwrap().as_deref() == Some("v2")
    })
    .await;
}

/// docs (TTLs and the stale window): if the load "passes the soft timeout ... the stale value
/// is served". A slow batch with stale values at hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_serves_stale_values_at_the_soft_timeout() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let shapes = common::every_shape(&server, |b| {
        b.ttl(Duration::from_millis(200))
            .stale_for(Duration::from_secs(20))
            .soft_timeout(Duration::from_millis(50))
    })
    .await;
    for (_, cache) in &shapes {
        values(
            cache
                .get_or_load_many(&[1, 2], Batches::default().load("old"))
                .await,
        );
    }
    sleep(Duration::from_millis(300)).await;
    for (shape, cache) in &shapes {
        let started = Instant::now();
        let got = cache
            .get_or_load_many(&[1, 2], |keys: Vec<u64>| async move {
                sleep(Duration::from_millis(400)).await;
                Ok::<_, std::io::Error>(
                    keys.into_iter()
                        .map(|k| (k, format!("new{k}")))
                        .collect::<HashMap<_, _>>(),
                )
            })
            .await;
        let took = started.elapsed();
        assert_eq!(
            values(got),
            [Some("old1".into()), Some("old2".into())],
            "{shape}"
        );
        assert!(
            took < Duration::from_millis(50) + SLACK,
            "{shape}: took {took:?}"
        );
    }
}

/// A background refresh that fails leaves the cached value served, and hands its lease back:
/// another instance can load the key at once when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_early_refresh_keeps_the_value_and_frees_the_lease() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let cfg = |b: common::Builder| b.ttl(Duration::from_secs(5)).early_refresh(100.0);
    let a = instance(&server, "ef", true, cfg).await;
    let n = runs();
    a.get_or_load(
        &1,
        timed_load(&n, Duration::from_millis(100), Duration::ZERO),
    )
    .await
    .unwrap();
    let failures = runs();
    for _ in 0..50 {
        let f = Arc::clone(&failures);
        let got = a
            .get_or_load(&1, async move {
                f.fetch_add(1, Ordering::SeqCst);
                Err::<Option<String>, _>(common::io_error("refresh fails"))
            })
            .await;
        assert_eq!(got.unwrap().as_deref(), Some("v1"));
        sleep(Duration::from_millis(5)).await;
    }
    assert!(failures.load(Ordering::SeqCst) >= 1, "a refresh was tried");
    sleep(Duration::from_millis(50)).await;
    assert_eq!(
        raw_get(&server, &lease("ef", 1)).await,
        None,
        "the lease was handed back"
    );
}

/// The consequence of the above for fencing: with a list under key 2, a batch of [1, 2] that
/// began before another instance invalidated key 1 must still not store key 1 after it
/// ("a load that began before an invalidation never stores its value after it").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_in_a_batch_does_not_unfence_its_other_keys() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "uf", true, |b| b).await;
    let b = instance(&server, "uf", true, |b| b).await;
    let c = instance(&server, "uf", false, |b| b).await;
    server.command(&["RPUSH", &rkey("uf", 2), "x"]).unwrap();
    let gate = Gate::new();
    let batches = Batches::default();
    let batch = tokio::spawn({
        let (a, load) = (a.clone(), batches.gated(&gate, "old"));
        async move { a.get_or_load_many(&[1, 2], load).await }
    });
    eventually("the batch is loading", async || !batches.calls().is_empty()).await;
    b.invalidate(&1).await.unwrap();
    gate.open();
    assert_eq!(
        values(batch.await.unwrap()),
        [Some("old1".into()), Some("old2".into())]
    );
    sleep(Duration::from_millis(150)).await;
    assert_eq!(
        c.get(&1).await.unwrap(),
        None,
        "key 1 stored after the invalidation"
    );
}

/// The same for concurrent single-key loads (whose reads share one MGET): a list under key 2
/// read alongside key 1 must not leave key 1's load unfenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_read_alongside_does_not_unfence_a_single_load() {
    let server = tokio::task::spawn_blocking(redis).await.unwrap();
    let a = instance(&server, "us", true, |b| b).await;
    let b = instance(&server, "us", true, |b| b).await;
    let c = instance(&server, "us", false, |b| b).await;
    let mut stored = 0;
    for round in 0..10_u64 {
        let (k1, k2) = (round * 2, round * 2 + 1);
        server.command(&["RPUSH", &rkey("us", k2), "x"]).unwrap();
        let gate = Gate::new();
        let n = runs();
        let mut loads = Vec::new();
        for k in [k1, k2] {
            let (a, load) = (a.clone(), gated(&gate, &n, "old"));
            loads.push(tokio::spawn(async move { a.get_or_load(&k, load).await }));
        }
        eventually("both load", async || n.load(Ordering::SeqCst) == 2).await;
        b.invalidate(&k1).await.unwrap();
        gate.open();
        for l in loads {
            assert_eq!(l.await.unwrap().unwrap().as_deref(), Some("old"));
        }
        sleep(Duration::from_millis(100)).await;
        if c.get(&k1).await.unwrap().is_some() {
            stored += 1;
        }
    }
    assert_eq!(
        stored, 0,
        "rounds in which key 1 was stored after its invalidation"
    );
}
