//! Caches for the tests: every combination of remote tier (in memory, a private redis-server)
//! and local tier (none, one).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_cache::{Cache, CacheBuilder, LocalTier};
use brisk_pool::redis_source::Multiplexed;
use brisk_testkit::RedisServer;

pub type Builder = CacheBuilder<u64, String>;

/// A private redis-server (blocking start: call before the async part or in `spawn_blocking`).
pub fn redis() -> RedisServer {
    RedisServer::builder()
        .private()
        .start()
        .expect("redis-server starts")
}

pub async fn connect(server: &RedisServer) -> Multiplexed {
    Multiplexed::builder(&server.url())
        .response_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connects")
}

/// The four shapes of cache, each named for failure messages, all from `configure`.
pub async fn every_shape(
    server: &RedisServer,
    configure: impl Fn(Builder) -> Builder,
) -> Vec<(&'static str, Cache<u64, String>)> {
    let redis = connect(server).await;
    let local = || LocalTier::entries(1_000);
    vec![
        (
            "memory",
            configure(Cache::builder("t-memory")).build().unwrap(),
        ),
        (
            "memory+local",
            configure(Cache::builder("t-memory-local"))
                .local(local())
                .build()
                .unwrap(),
        ),
        (
            "redis",
            configure(Cache::builder("t-redis"))
                .redis(redis.clone())
                .build()
                .unwrap(),
        ),
        (
            "redis+local",
            configure(Cache::builder("t-redis-local"))
                .redis(redis)
                .local(local())
                .build()
                .unwrap(),
        ),
    ]
}

/// Counts how often it loads.
#[derive(Clone, Default)]
pub struct Source {
    pub loads: Arc<AtomicUsize>,
}

impl Source {
    pub fn load(
        &self,
        value: &str,
    ) -> impl Future<Output = Result<Option<String>, std::io::Error>> + Send + use<> {
        let loads = Arc::clone(&self.loads);
        let value = value.to_owned();
        async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(Some(value))
        }
    }

    pub fn count(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }
}

pub fn io_error(message: &str) -> std::io::Error {
    std::io::Error::other(message.to_owned())
}

/// The raw bytes Redis holds under `key`, with a plain redis-rs connection.
pub async fn raw_get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

pub async fn raw_set(server: &RedisServer, key: &str, value: &[u8]) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Waits (bounded) until `check` holds: the remote write after a load lands on its own task.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 2 s: {what}");
}

/// The key can be loaded (again): a fresh load runs and its value is served.
pub async fn assert_loads_again(cache: &brisk_cache::Cache<u64, String>, key: u64) {
    let source = Source::default();
    let value = cache.get_or_load(&key, source.load("ok")).await.unwrap();
    assert_eq!(value.as_deref(), Some("ok"));
    assert_eq!(source.count(), 1, "a fresh load ran");
}

/// Any command on a fresh connection of its own (outside every cache): its reply.
pub async fn raw<A: AsRef<[u8]>>(server: &RedisServer, args: &[A]) -> redis::Value {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(std::str::from_utf8(args[0].as_ref()).unwrap());
    for arg in &args[1..] {
        cmd.arg(arg.as_ref());
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// A reply that is text (`INFO`, `CLIENT LIST`), as text.
pub fn text(value: redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
        redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text) => text,
        other => panic!("not text: {other:?}"),
    }
}

/// Reads of this server so far: its GET and MGET calls.
pub async fn reads(server: &RedisServer) -> u64 {
    let info = text(raw(server, &["INFO", "commandstats"]).await);
    info.lines()
        .filter(|line| line.starts_with("cmdstat_get:") || line.starts_with("cmdstat_mget:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Polls `check` every 2 ms; fails unless it holds within `bound`.
pub async fn within(bound: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < bound, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
