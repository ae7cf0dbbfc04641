//! The remote tier: Redis through any `RedisSource`, or an in-memory map standing in for it.

use std::fmt;
use std::sync::Arc;
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
pub(crate) trait RedisOps: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Vec<u8>>, RemoteError>>;
    fn set<'a>(
        &'a self,
        key: &'a [u8],
        value: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    fn del<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), RemoteError>>;
    fn kind(&self) -> &'static str;
}

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
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn del<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
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
    durations: [Histogram; 3],
    cache: Arc<str>,
}

const OPERATIONS: [&str; 3] = ["get", "set", "del"];

#[derive(Clone, Copy)]
enum Op {
    Get = 0,
    Set = 1,
    Del = 2,
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
