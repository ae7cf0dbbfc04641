//! The remote tier: Redis through any `RedisSource`, or an in-memory map standing in for it.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use brisk_core::deadline;
use brisk_metrics::Histogram;
use brisk_metrics::catalog::CACHE_REMOTE_DURATION;
use brisk_pool::redis_source::RedisSource;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerConfig};
use crate::error::RemoteError;
use crate::key::lease_key;

/// Where the remote tier lives; chosen on the builder.
pub(crate) enum Store {
    /// In this process: a bounded map of envelopes with their expiry.
    Memory(quick_cache::sync::Cache<Vec<u8>, Arc<Stored>, StoredWeight>),
    Redis {
        ops: Box<dyn RedisOps>,
        breaker: Breaker,
    },
}

pub(crate) struct Stored {
    bytes: Vec<u8>,
    expires: Instant,
}

#[derive(Clone)]
pub(crate) struct StoredWeight;

impl quick_cache::Weighter<Vec<u8>, Arc<Stored>> for StoredWeight {
    fn weight(&self, key: &Vec<u8>, stored: &Arc<Stored>) -> u64 {
        (key.len() + stored.bytes.len()) as u64
    }
}

/// Redis commands over any source, behind one object-safe face so `Cache` need not carry the
/// source's type. One allocation per command, against a network round trip.
///
/// Every write of a key also ends the lease on it (`<key>:lease`, same hash slot), so that a
/// load in progress anywhere can no longer store what it loaded.
pub(crate) trait RedisOps: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Vec<u8>>, RemoteError>>;
    /// Stores `value` and ends the key's lease.
    fn set<'a>(
        &'a self,
        key: &'a [u8],
        value: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    /// Removes the key and its lease.
    fn del<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), RemoteError>>;
    /// Takes the lease on `key` for `token`, for `ttl_ms`, if no one holds it.
    fn acquire<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Lease, RemoteError>>;
    /// Stores `value` only while `token` still holds the key's lease, and ends the lease;
    /// `false` when the lease was gone (invalidated, overwritten or expired).
    fn put_fenced<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        value: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<bool, RemoteError>>;
    /// Ends the lease on `key` if `token` still holds it.
    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    fn kind(&self) -> &'static str;
}

/// What asking for a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// This load holds it now.
    Acquired,
    /// Another load holds it, for at most this much longer.
    Held(Duration),
}

/// `KEYS`: the lease. `ARGV`: the token, the lease's TTL in ms. `{1}` when taken, else `{0,
/// the holder's remaining ms}`.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('PTTL', KEYS[1])}
";

/// `KEYS`: the entry, its lease. `ARGV`: the token, the bytes, their TTL in ms.
const PUT_FENCED: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

/// `KEYS`: the entry, its lease. `ARGV`: the bytes, their TTL in ms.
const WRITE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
";

/// `KEYS`: the lease. `ARGV`: the token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// The scripts, run by `EVALSHA` (loaded again on `NOSCRIPT`, after a restart or failover).
struct Scripts {
    acquire: redis::Script,
    put_fenced: redis::Script,
    write: redis::Script,
    release: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: redis::Script::new(ACQUIRE),
    put_fenced: redis::Script::new(PUT_FENCED),
    write: redis::Script::new(WRITE),
    release: redis::Script::new(RELEASE),
});

async fn connect<S: RedisSource>(source: &S) -> Result<S::Connection, RemoteError> {
    source
        .connection()
        .await
        .map_err(|err| RemoteError::Source(Arc::new(err)))
}

fn redis_error(err: redis::RedisError) -> RemoteError {
    RemoteError::Redis(Arc::new(err))
}

impl<S: RedisSource> RedisOps for S {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Vec<u8>>, RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a [u8],
        value: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            SCRIPTS
                .write
                .key(key)
                .key(lease_key(key))
                .arg(value)
                .arg(ttl_ms.max(1))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(redis_error)
        })
    }

    fn del<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            redis::cmd("DEL")
                .arg(key)
                .arg(lease_key(key))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Lease, RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            let reply: Vec<i64> = SCRIPTS
                .acquire
                .key(lease_key(key))
                .arg(token)
                .arg(ttl_ms.max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(match reply.as_slice() {
                [1] => Lease::Acquired,
                // A lease with no TTL (written by hand) or gone meanwhile: wait a little.
                [_, left] => Lease::Held(Duration::from_millis(u64::try_from(*left).unwrap_or(1))),
                _ => Lease::Held(Duration::from_millis(1)),
            })
        })
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        value: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<bool, RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            SCRIPTS
                .put_fenced
                .key(key)
                .key(lease_key(key))
                .arg(token)
                .arg(value)
                .arg(ttl_ms.max(1))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|stored| stored == 1)
                .map_err(redis_error)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            SCRIPTS
                .release
                .key(lease_key(key))
                .arg(token)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(redis_error)
        })
    }

    fn kind(&self) -> &'static str {
        std::any::type_name::<S>()
    }
}

/// The remote tier with its timeout, breaker and metrics.
pub(crate) struct Remote {
    store: Store,
    timeout: Duration,
    durations: [Histogram; 4],
    cache: Arc<str>,
}

const OPERATIONS: [&str; 4] = ["get", "set", "del", "lease"];

#[derive(Clone, Copy)]
enum Op {
    Get = 0,
    Set = 1,
    Del = 2,
    Lease = 3,
}

impl Remote {
    pub(crate) fn memory(max_bytes: u64, cache: &str) -> Self {
        let estimate = usize::try_from((max_bytes / 256).clamp(64, 1 << 20)).unwrap_or(1 << 20);
        Self::with(
            Store::Memory(quick_cache::sync::Cache::with_weighter(
                estimate,
                max_bytes,
                StoredWeight,
            )),
            Duration::MAX,
            cache,
        )
    }

    pub(crate) fn redis(
        ops: Box<dyn RedisOps>,
        timeout: Duration,
        breaker: BreakerConfig,
        cache: &Arc<str>,
    ) -> Self {
        let gauge =
            brisk_metrics::catalog::CACHE_BREAKER_STATE.gauge(&[("cache", cache.to_string())]);
        let breaker = Breaker::new(breaker, gauge, cache.clone());
        Self::with(Store::Redis { ops, breaker }, timeout, cache)
    }

    fn with(store: Store, timeout: Duration, cache: &str) -> Self {
        let histogram = |op: &'static str| {
            CACHE_REMOTE_DURATION
                .histogram(&[("cache", cache.to_owned()), ("operation", op.to_owned())])
        };
        Self {
            store,
            timeout,
            durations: OPERATIONS.map(histogram),
            cache: cache.into(),
        }
    }

    /// Runs one Redis command within `min(within, deadline::remaining())`, through the breaker.
    async fn call<T>(
        &self,
        op: Op,
        within: Duration,
        command: impl Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let Store::Redis { breaker, .. } = &self.store else {
            unreachable!("only the Redis store sends commands")
        };
        if !breaker.allow() {
            return Err(RemoteError::BreakerOpen);
        }
        let histogram = &self.durations[op as usize];
        let started = histogram.is_enabled().then(Instant::now);
        let span = tracing::debug_span!("brisk_cache_remote", cache = %self.cache, operation = OPERATIONS[op as usize]);
        let result = match deadline::bounded(within, command).instrument(span).await {
            Ok(result) => result,
            Err(elapsed) => Err(RemoteError::Timeout(elapsed)),
        };
        if let Some(started) = started {
            histogram.record(started.elapsed().as_secs_f64());
        }
        match &result {
            Ok(_) => breaker.success(),
            // The caller's own deadline is no sign of a sick Redis.
            Err(RemoteError::Timeout(elapsed)) if elapsed.is_deadline() => {}
            Err(_) => breaker.failure(),
        }
        result
    }

    pub(crate) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RemoteError> {
        match &self.store {
            Store::Memory(map) => Ok(map
                .get(key)
                .filter(|stored| Instant::now() < stored.expires)
                .map(|stored| stored.bytes.clone())),
            Store::Redis { ops, .. } => self.call(Op::Get, self.timeout, ops.get(key)).await,
        }
    }

    pub(crate) async fn set(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
        within: Duration,
    ) -> Result<(), RemoteError> {
        match &self.store {
            Store::Memory(map) => {
                let expires = Instant::now() + ttl;
                map.insert(
                    key.to_vec(),
                    Arc::new(Stored {
                        bytes: value.to_vec(),
                        expires,
                    }),
                );
                Ok(())
            }
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                self.call(Op::Set, within, ops.set(key, value, ttl_ms))
                    .await
            }
        }
    }

    /// Whether loads here take leases: only across processes, that is over Redis.
    pub(crate) fn leases(&self) -> bool {
        matches!(self.store, Store::Redis { .. })
    }

    pub(crate) async fn acquire(
        &self,
        key: &[u8],
        token: &str,
        ttl: Duration,
    ) -> Result<Lease, RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(Lease::Acquired),
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                self.call(Op::Lease, self.timeout, ops.acquire(key, token, ttl_ms))
                    .await
            }
        }
    }

    /// [`set`](Self::set), only while `token` holds the key's lease: `Ok(false)` when it did
    /// not (nothing was written).
    pub(crate) async fn put_fenced(
        &self,
        key: &[u8],
        token: &str,
        value: &[u8],
        ttl: Duration,
        within: Duration,
    ) -> Result<bool, RemoteError> {
        match &self.store {
            Store::Memory(_) => self.set(key, value, ttl, within).await.map(|()| true),
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                self.call(Op::Set, within, ops.put_fenced(key, token, value, ttl_ms))
                    .await
            }
        }
    }

    pub(crate) async fn release(&self, key: &[u8], token: &str) -> Result<(), RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Redis { ops, .. } => {
                self.call(Op::Lease, self.timeout, ops.release(key, token))
                    .await
            }
        }
    }

    pub(crate) async fn del(&self, key: &[u8], within: Duration) -> Result<(), RemoteError> {
        match &self.store {
            Store::Memory(map) => {
                map.remove(key);
                Ok(())
            }
            Store::Redis { ops, .. } => self.call(Op::Del, within, ops.del(key)).await,
        }
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            Store::Memory(map) => f
                .debug_struct("Memory")
                .field("max_bytes", &map.capacity())
                .finish(),
            // The source's type, never its URL: nothing here can show a credential.
            Store::Redis { ops, .. } => f
                .debug_struct("Redis")
                .field("source", &ops.kind())
                .field("timeout", &self.timeout)
                .finish(),
        }
    }
}
