//! brisk-cache beside the crates and raw commands it stands on.
//!
//! - `cache/codec`: encode + decode of a realistic 1 KiB struct: `json` (`serde_json`),
//!   `postcard`, `msgpack` (rmp-serde, with field names) — how the default codec was chosen.
//! - `cache/local_hit`: a local-tier hit, Zipf keys (s = 1) over 100,000 entries: `brisk` (a
//!   `Cache` with a local tier) beside `quick_cache` (the crate its local tier is) and `moka`
//!   (sync), each `get` of the same keys; values a `u64` and a 200-byte `String`.
//! - `cache/remote_hit`: a hit of a 1 KiB value on a private redis-server, no local tier,
//!   concurrency 1 in a spawned task: `brisk` beside `redis` (raw redis-rs multiplexed GET plus
//!   the same MessagePack decode), and `multiplexed` (the same on brisk-pool's `Multiplexed`, the
//!   connection the cache runs on: what the cache itself adds). After it, `redis-benchmark -c 1`
//!   GET p50 on the same server.
//! - `cache/get_or_load_miss`: a miss of a fresh key, an instant loader, the value stored:
//!   `brisk` beside `redis` (raw GET, the load, MessagePack encode, SET, each awaited). brisk
//!   returns once the value is loaded and writes Redis on the load's task, so at concurrency 1
//!   its SET overlaps the next call's GET: the figures compare what a caller waits for.
//!
//! - `cache/get_or_load_many`: 100 keys, half cached (the same 50) and half fresh each time,
//!   an instant batch loader, no local tier: `brisk` (`get_or_load_many`) beside `loop` (a
//!   `get_or_load` per key, in turn) and `hand` (raw redis-rs: `MGET`, decode the hits, load the
//!   misses, encode, one pipeline of `SET … PX`) — the hand-written version it replaces.
//! - `cache/remote_hit_concurrent`: 256 concurrent readers of distinct keys (1 KiB values, no
//!   local tier), each a hit: `brisk` beside `redis` (raw redis-rs multiplexed GET plus decode
//!   per key). After it, `redis-benchmark -c 256 -P 16` GET throughput on the same server.
//!
//! Run: `cargo bench --bench cache`.
#![allow(clippy::print_stdout, missing_docs)] // the physical-limit report

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use brisk_cache::{Cache, LocalTier};
use brisk_pool::redis_source::{Multiplexed, RedisSource};
use criterion::{BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};

#[path = "support/redis_benchmark.rs"]
mod redis_benchmark;
#[path = "support/spread.rs"]
mod spread;
#[path = "support/zipf.rs"]
mod zipf;

use spread::spread;

/// A user profile of about 1 KiB in JSON: what services cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    email: String,
    created_at: i64,
    verified: bool,
    roles: Vec<String>,
    bio: String,
    follower_ids: Vec<u64>,
    settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    locale: String,
    notifications: bool,
    items_per_page: u32,
}

fn profile(id: u64) -> Profile {
    Profile {
        id,
        name: format!("User Number {id}"),
        email: format!("user{id}@example.com"),
        created_at: 1_700_000_000 + i64::try_from(id).unwrap_or(0),
        verified: id.is_multiple_of(2),
        roles: vec!["reader".into(), "writer".into(), "reviewer".into()],
        bio: "Backend engineer who likes fast services, small crates and honest benchmarks. "
            .repeat(6),
        follower_ids: (0..40).map(|i| id * 1_000 + i).collect(),
        settings: Settings {
            theme: "dark".into(),
            locale: "en-GB".into(),
            notifications: true,
            items_per_page: 50,
        },
    }
}

fn codec(c: &mut Criterion) {
    let value = profile(42);
    let json_len = serde_json::to_vec(&value).unwrap().len();
    println!(
        "cache/codec sizes: json {json_len} B, postcard {} B, msgpack {} B",
        postcard::to_stdvec(&value).unwrap().len(),
        rmp_serde::to_vec_named(&value).unwrap().len()
    );
    let mut group = c.benchmark_group("cache/codec");
    group.throughput(Throughput::Bytes(json_len as u64));
    group.bench_function("json", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(&value).unwrap();
            serde_json::from_slice::<Profile>(&bytes).unwrap()
        });
    });
    group.bench_function("postcard", |b| {
        b.iter(|| {
            let bytes = postcard::to_stdvec(&value).unwrap();
            postcard::from_bytes::<Profile>(&bytes).unwrap()
        });
    });
    group.bench_function("msgpack", |b| {
        b.iter(|| {
            let bytes = rmp_serde::to_vec_named(&value).unwrap();
            rmp_serde::from_slice::<Profile>(&bytes).unwrap()
        });
    });
    group.finish();
}

const ENTRIES: u64 = 100_000;

/// One scenario of `cache/local_hit`: every contender holds `value(k)` for each of the keys.
fn local_hit_of<V>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    kind: &str,
    value: fn(u64) -> V,
) where
    V: Clone
        + PartialEq
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let keys = zipf::zipf_keys(ENTRIES, 1.0, 1 << 20, 0x5EED);
    let brisk: Cache<u64, V> = Cache::builder("bench")
        .ttl(Duration::from_secs(3_600))
        .local(LocalTier::entries(ENTRIES * 2))
        .build()
        .unwrap();
    let quick = quick_cache::sync::Cache::<u64, V>::new(usize::try_from(ENTRIES * 2).unwrap());
    let moka = moka::sync::Cache::<u64, V>::new(ENTRIES * 2);
    rt.block_on(async {
        for k in 0..ENTRIES {
            brisk.set(&k, value(k)).await.unwrap();
            quick.insert(k, value(k));
            moka.insert(k, value(k));
        }
    });
    moka.run_pending_tasks();
    let mut i = 0;
    let mut next = move || {
        i = (i + 1) & (keys.len() - 1);
        keys[i]
    };
    group.bench_function(BenchmarkId::new("brisk", kind), |b| {
        b.iter(|| {
            let k = next();
            let hit = brisk
                .get(&k)
                .now_or_never()
                .expect("a local hit never waits");
            assert!(hit.unwrap().is_some());
        });
    });
    group.bench_function(BenchmarkId::new("quick_cache", kind), |b| {
        b.iter(|| {
            let k = next();
            assert!(quick.get(&k).is_some());
        });
    });
    group.bench_function(BenchmarkId::new("moka", kind), |b| {
        b.iter(|| {
            let k = next();
            assert!(moka.get(&k).is_some());
        });
    });
}

fn local_hit(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("cache/local_hit");
    group.throughput(Throughput::Elements(1));
    // A number, and a 200-byte string (a rendered fragment, a name and address).
    local_hit_of(&mut group, rt, "u64", |k| k);
    local_hit_of(&mut group, rt, "string", |k| format!("{k:0>200}"));
    group.finish();
}

const HOT: u64 = 7;

fn raw_key(k: u64) -> String {
    format!("{{brisk:bench:1:i:{k}}}")
}

fn remote_hit(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (brisk, raw, multiplexed) = rt.block_on(async {
        let redis = Multiplexed::connect(url).await.unwrap();
        let cache: Cache<u64, Profile> = Cache::builder("bench")
            .ttl(Duration::from_secs(3_600))
            .redis(redis.clone())
            .build()
            .unwrap();
        cache.set(&HOT, profile(HOT)).await.unwrap();
        // The raw contender reads its own copy in the cache's codec (MessagePack), no envelope.
        let client = redis::Client::open(url).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let packed = rmp_serde::to_vec_named(&profile(HOT)).unwrap();
        let () = redis::cmd("SET")
            .arg("raw:7")
            .arg(packed)
            .query_async(&mut raw)
            .await
            .unwrap();
        (Arc::new(cache), raw, redis)
    });
    let mut group = c.benchmark_group("cache/remote_hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("brisk", 1), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let cache = brisk.clone();
            spread(iters, 1, move || {
                let cache = cache.clone();
                async move {
                    let hit = cache.get(&HOT).await.unwrap();
                    assert_eq!(hit.map(|p| p.id), Some(HOT));
                }
            })
        });
    });
    // The connection brisk's cache runs on, without the cache: what the cache itself adds.
    group.bench_function(BenchmarkId::new("multiplexed", 1), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let source = multiplexed.clone();
            spread(iters, 1, move || {
                let source = source.clone();
                async move {
                    let mut conn = source.connection().await.unwrap();
                    let bytes: Vec<u8> = redis::cmd("GET")
                        .arg("raw:7")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let p: Profile = rmp_serde::from_slice(&bytes).unwrap();
                    assert_eq!(p.id, HOT);
                }
            })
        });
    });
    group.bench_function(BenchmarkId::new("redis", 1), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let conn = raw.clone();
            spread(iters, 1, move || {
                let mut conn = conn.clone();
                async move {
                    let bytes: Vec<u8> = redis::cmd("GET")
                        .arg("raw:7")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let p: Profile = rmp_serde::from_slice(&bytes).unwrap();
                    assert_eq!(p.id, HOT);
                }
            })
        });
    });
    group.finish();
}

fn miss(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (brisk, raw) = rt.block_on(async {
        let redis = Multiplexed::connect(url).await.unwrap();
        let cache: Cache<u64, Profile> = Cache::builder("miss")
            .ttl(Duration::from_secs(60))
            .redis(redis)
            .build()
            .unwrap();
        let client = redis::Client::open(url).unwrap();
        (
            Arc::new(cache),
            client.get_multiplexed_async_connection().await.unwrap(),
        )
    });
    let fresh = Arc::new(AtomicU64::new(1 << 32));
    let mut group = c.benchmark_group("cache/get_or_load_miss");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("brisk", 1), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (cache, fresh) = (brisk.clone(), fresh.clone());
            spread(iters, 1, move || {
                let (cache, fresh) = (cache.clone(), fresh.clone());
                async move {
                    let k = fresh.fetch_add(1, Ordering::Relaxed);
                    let got = cache
                        .get_or_load(&k, async move { Ok::<_, std::io::Error>(Some(profile(k))) })
                        .await;
                    assert!(got.unwrap().is_some());
                }
            })
        });
    });
    group.bench_function(BenchmarkId::new("redis", 1), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (conn, fresh) = (raw.clone(), fresh.clone());
            spread(iters, 1, move || {
                let (mut conn, fresh) = (conn.clone(), fresh.clone());
                async move {
                    let k = fresh.fetch_add(1, Ordering::Relaxed);
                    let key = raw_key(k);
                    let found: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(found.is_none());
                    let value = profile(k);
                    let bytes = rmp_serde::to_vec_named(&value).unwrap();
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg(bytes)
                        .arg("PX")
                        .arg(60_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            })
        });
    });
    group.finish();
}

/// redis-benchmark's GET p50 at one client, 1 KiB values, on the same server.
fn physical_limit(port: u16) {
    match redis_benchmark::get(port, &["-d", "1024", "-n", "50000", "-c", "1"]) {
        Ok(text) => {
            let summary: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.contains("latency summary"))
                .take(3)
                .collect();
            println!(
                "redis-benchmark -c 1 -d 1024 GET latency (msec):\n{}",
                summary.join("\n")
            );
        }
        Err(why) => println!("{why}"),
    }
}

/// 100 keys: the 50 cached ones and 50 fresh.
fn hundred(fresh: &AtomicU64) -> Vec<u64> {
    let base = fresh.fetch_add(50, Ordering::Relaxed);
    (0..50).chain(base..base + 50).collect()
}

fn get_many(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (brisk, raw) = rt.block_on(async {
        let cache: Cache<u64, Profile> = Cache::builder("many")
            .ttl(Duration::from_secs(600))
            .redis(Multiplexed::connect(url).await.unwrap())
            .build()
            .unwrap();
        let client = redis::Client::open(url).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        for k in 0..50 {
            cache.set(&k, profile(k)).await.unwrap();
            let () = redis::cmd("SET")
                .arg(format!("raw:{k}"))
                .arg(rmp_serde::to_vec_named(&profile(k)).unwrap())
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        (Arc::new(cache), raw)
    });
    let fresh = Arc::new(AtomicU64::new(1 << 32));
    let mut group = c.benchmark_group("cache/get_or_load_many");
    group.throughput(Throughput::Elements(100));
    let load = |missing: Vec<u64>| async move {
        Ok::<_, std::io::Error>(
            missing
                .into_iter()
                .map(|k| (k, profile(k)))
                .collect::<std::collections::HashMap<_, _>>(),
        )
    };
    group.bench_function(BenchmarkId::new("brisk", 100), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (cache, fresh) = (brisk.clone(), fresh.clone());
            spread(iters, 1, move || {
                let (cache, keys) = (cache.clone(), hundred(&fresh));
                async move {
                    let got = cache.get_or_load_many(&keys, load).await;
                    assert!(got.iter().all(|r| matches!(r, Ok(Some(_)))));
                }
            })
        });
    });
    group.bench_function(BenchmarkId::new("loop", 100), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (cache, fresh) = (brisk.clone(), fresh.clone());
            spread(iters, 1, move || {
                let (cache, keys) = (cache.clone(), hundred(&fresh));
                async move {
                    for k in keys {
                        let got = cache
                            .get_or_load(
                                &k,
                                async move { Ok::<_, std::io::Error>(Some(profile(k))) },
                            )
                            .await;
                        assert!(got.unwrap().is_some());
                    }
                }
            })
        });
    });
    group.bench_function(BenchmarkId::new("hand", 100), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (conn, fresh) = (raw.clone(), fresh.clone());
            spread(iters, 1, move || {
                let (mut conn, keys) = (conn.clone(), hundred(&fresh));
                async move {
                    let names: Vec<String> = keys.iter().map(|k| format!("raw:{k}")).collect();
                    let found: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(&names)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let mut values = Vec::with_capacity(keys.len());
                    let mut missing = Vec::new();
                    for (&k, bytes) in keys.iter().zip(found) {
                        match bytes {
                            Some(bytes) => {
                                values.push(rmp_serde::from_slice::<Profile>(&bytes).unwrap());
                            }
                            None => missing.push(k),
                        }
                    }
                    let loaded = load(missing).await.unwrap();
                    let mut pipe = redis::pipe();
                    for (k, value) in &loaded {
                        pipe.cmd("SET")
                            .arg(format!("raw:{k}"))
                            .arg(rmp_serde::to_vec_named(value).unwrap())
                            .arg("PX")
                            .arg(600_000)
                            .ignore();
                    }
                    let () = pipe.query_async(&mut conn).await.unwrap();
                    values.extend(loaded.into_values());
                    assert_eq!(values.len(), 100);
                }
            })
        });
    });
    group.finish();
}

/// Readers at once in `cache/remote_hit_concurrent`.
const READERS: u64 = 256;

fn remote_hit_concurrent(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (brisk, raw) = rt.block_on(async {
        let cache: Cache<u64, Profile> = Cache::builder("conc")
            .ttl(Duration::from_secs(3_600))
            .redis(Multiplexed::connect(url).await.unwrap())
            .build()
            .unwrap();
        let client = redis::Client::open(url).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        for k in 0..READERS {
            cache.set(&k, profile(k)).await.unwrap();
            let () = redis::cmd("SET")
                .arg(format!("raw:{k}"))
                .arg(rmp_serde::to_vec_named(&profile(k)).unwrap())
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        (Arc::new(cache), raw)
    });
    let mut group = c.benchmark_group("cache/remote_hit_concurrent");
    group.throughput(Throughput::Elements(1));
    let next = Arc::new(AtomicU64::new(0));
    group.bench_function(BenchmarkId::new("brisk", READERS), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (cache, next) = (brisk.clone(), next.clone());
            spread(iters, READERS, move || {
                let cache = cache.clone();
                let k = next.fetch_add(1, Ordering::Relaxed) % READERS;
                async move {
                    let hit = cache.get(&k).await.unwrap();
                    assert_eq!(hit.map(|p| p.id), Some(k));
                }
            })
        });
    });
    group.bench_function(BenchmarkId::new("redis", READERS), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (conn, next) = (raw.clone(), next.clone());
            spread(iters, READERS, move || {
                let mut conn = conn.clone();
                let k = next.fetch_add(1, Ordering::Relaxed) % READERS;
                async move {
                    let bytes: Vec<u8> = redis::cmd("GET")
                        .arg(format!("raw:{k}"))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let p: Profile = rmp_serde::from_slice(&bytes).unwrap();
                    assert_eq!(p.id, k);
                }
            })
        });
    });
    group.finish();
}

/// redis-benchmark's GET throughput at 256 clients, 16 pipelined, 1 KiB values.
fn concurrent_limit(port: u16) {
    match redis_benchmark::get(
        port,
        &["-d", "1024", "-n", "500000", "-c", "256", "-P", "16", "-q"],
    ) {
        Ok(text) => println!("redis-benchmark -c 256 -P 16 -d 1024: {}", text.trim()),
        Err(why) => println!("{why}"),
    }
}

/// A remote hit of an entry with two tags beside one without: what the tag check costs a hit
/// (the tags' times are known in process; re-read once a second without an invalidation
/// connection, which these caches do not have).
fn tagged_hit(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let (tagged, untagged) = rt.block_on(async {
        let redis = Multiplexed::connect(url).await.unwrap();
        let build = |name: &str, tags: bool| {
            let builder = Cache::<u64, Profile>::builder(name)
                .ttl(Duration::from_secs(3_600))
                .redis(redis.clone());
            if tags {
                builder.tags(|id: &u64, _: Option<&Profile>| {
                    vec![format!("user:{id}"), "kind:profile".to_owned()]
                })
            } else {
                builder
            }
            .build()
            .unwrap()
        };
        let (tagged, untagged) = (build("bench-tagged", true), build("bench-untagged", false));
        tagged.set(&HOT, profile(HOT)).await.unwrap();
        untagged.set(&HOT, profile(HOT)).await.unwrap();
        (Arc::new(tagged), Arc::new(untagged))
    });
    let mut group = c.benchmark_group("cache/tagged_hit");
    group.throughput(Throughput::Elements(1));
    for (name, cache) in [("tagged", tagged), ("untagged", untagged)] {
        group.bench_function(BenchmarkId::new(name, 2), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let cache = cache.clone();
                spread(iters, 1, move || {
                    let cache = cache.clone();
                    async move {
                        let hit = cache.get(&HOT).await.unwrap();
                        assert_eq!(hit.map(|p| p.id), Some(HOT));
                    }
                })
            });
        });
    }
    group.finish();
}

fn main() {
    let (server, rt) = redis_benchmark::server_and_runtime();
    let url = server.url();
    let mut criterion = Criterion::default().configure_from_args();
    codec(&mut criterion);
    local_hit(&mut criterion, &rt);
    remote_hit(&mut criterion, &rt, &url);
    tagged_hit(&mut criterion, &rt, &url);
    miss(&mut criterion, &rt, &url);
    get_many(&mut criterion, &rt, &url);
    remote_hit_concurrent(&mut criterion, &rt, &url);
    criterion.final_summary();
    physical_limit(server.port().expect("TCP"));
    concurrent_limit(server.port().expect("TCP"));
}
