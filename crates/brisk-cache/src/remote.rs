//! The remote tier: Redis through any `RedisSource`, or an in-memory map standing in for it.

use std::collections::HashMap;
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

use brisk_batch::{BatchFn, LoadError, Loader};

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
    /// Takes the lease on `key` for `token`, for `ttl_ms`, if no one holds it; and reads what
    /// `key` holds, in the same step (a value stored between a read and a lease taken after
    /// it would be loaded again).
    fn acquire<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseAnswer, RemoteError>>;
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
    /// `MGET` of `keys` (redis-rs splits it by slot on a cluster), answered in order.
    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Option<Vec<u8>>>, RemoteError>>;
    /// Reads `keys` and takes the lease of each one missing, in one script (one per hash
    /// slot on a cluster, concurrently), answered in order.
    fn read_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Read>, RemoteError>>;
    /// [`acquire`](Self::acquire) of each key, in one pipeline: whether each was taken.
    fn acquire_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<bool>, RemoteError>>;
    /// Stores each `(key, value, ttl_ms)`, in one pipeline: fenced by `token` (as
    /// [`put_fenced`](Self::put_fenced)) or, without one, as [`set`](Self::set). Whether each
    /// was stored.
    fn put_many<'a>(
        &'a self,
        items: &'a [(Vec<u8>, Vec<u8>, u64)],
        token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, RemoteError>>;
    /// [`release`](Self::release) of each key, in one pipeline.
    fn release_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    /// Sets a tag's time to `at_us` unless it holds a later one; either way it lives `ttl_ms`
    /// at least.
    fn stamp<'a>(
        &'a self,
        key: &'a [u8],
        at_us: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    /// `PUBLISH` of each message on `channel`, in one pipeline, in order.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        messages: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<(), RemoteError>>;
    fn kind(&self) -> &'static str;
}

/// One key of a [`RedisOps::read_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// The stored bytes (no lease was asked for).
    Value(Vec<u8>),
    /// Nothing stored; the lease is this reader's now.
    Leased,
    /// Nothing stored; another load holds the lease.
    Held,
}

/// `KEYS`: the entries, then their leases. `ARGV`: the token, the leases' TTL in ms. Per key
/// the stored bytes, or 1 (leased now) or 0 (leased by another). Read and lease are one step:
/// no value stored between them is loaded again.
const READ_MANY: &str = r"
local n = #KEYS / 2
local out = {}
local i = 1
while i <= n do
  -- One MGET per thousand keys (unpack's limit), not a GET per key: Lua's calls into Redis
  -- are most of a script's cost. A value of another type reads as missing (nil).
  local j = math.min(i + 999, n)
  local vs = redis.call('MGET', unpack(KEYS, i, j))
  for k = i, j do
    local v = vs[k - i + 1]
    if v then out[k] = v
    elseif redis.call('SET', KEYS[n + k], ARGV[1], 'NX', 'PX', ARGV[2]) then out[k] = 1
    else out[k] = 0 end
  end
  i = j + 1
end
return out
";

/// `KEYS`: the entries, then their leases. `ARGV`: the token (empty: write unfenced), then
/// each entry's bytes and TTL in ms. Per key 1 if stored, 0 if fenced out.
const PUT_MANY: &str = r"
local n = #KEYS / 2
local out = {}
local i = 1
while i <= n do
  -- As READ_MANY: the leases read by one MGET and ended by one DEL per thousand keys.
  local j = math.min(i + 999, n)
  local held = {}
  if ARGV[1] ~= '' then held = redis.call('MGET', unpack(KEYS, n + i, n + j)) end
  local ended = {}
  for k = i, j do
    if ARGV[1] == '' or held[k - i + 1] == ARGV[1] then
      redis.call('SET', KEYS[k], ARGV[2 * k], 'PX', ARGV[2 * k + 1])
      ended[#ended + 1] = KEYS[n + k]
      out[k] = 1
    else out[k] = 0 end
  end
  if #ended > 0 then redis.call('DEL', unpack(ended)) end
  i = j + 1
end
return out
";

/// What asking for a lease answered: the lease, and what the key held at that moment.
pub(crate) type LeaseAnswer = (Lease, Option<Vec<u8>>);

/// What asking for a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// This load holds it now.
    Acquired,
    /// Another load holds it, for at most this much longer.
    Held(Duration),
}

/// `KEYS`: the entry, its lease. `ARGV`: the token, the lease's TTL in ms. `{1, 0, bytes}`
/// when taken, else `{0, the holder's remaining ms, bytes}`; `bytes` what the entry holds, nil
/// if nothing (or a value of another type, which `pcall` turns into an error reply).
const ACQUIRE: &str = r"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' then v = false end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0, v} end
return {0, redis.call('PTTL', KEYS[2]), v}
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

/// `KEYS`: a tag's (or clear's) time. `ARGV`: the time in Unix µs, the key's TTL in ms. Keeps
/// the later time, so that two instances invalidating at once never move it back.
const STAMP: &str = r"
local t = tonumber(redis.pcall('GET', KEYS[1])) or 0
if tonumber(ARGV[1]) > t then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

/// The scripts, run by `EVALSHA` (loaded again on `NOSCRIPT`, after a restart or failover).
struct Scripts {
    read_many: redis::Script,
    put_many: redis::Script,
    acquire: redis::Script,
    put_fenced: redis::Script,
    write: redis::Script,
    release: redis::Script,
    stamp: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    read_many: redis::Script::new(READ_MANY),
    put_many: redis::Script::new(PUT_MANY),
    acquire: redis::Script::new(ACQUIRE),
    put_fenced: redis::Script::new(PUT_FENCED),
    write: redis::Script::new(WRITE),
    release: redis::Script::new(RELEASE),
    stamp: redis::Script::new(STAMP),
});

async fn connect<S: RedisSource>(source: &S) -> Result<S::Connection, RemoteError> {
    source
        .connection()
        .await
        .map_err(|err| RemoteError::Source(Arc::new(err)))
}

/// `reply` if it has one answer for each of the `asked`, else [`RemoteError::Reply`].
fn answered<T>(what: &str, asked: usize, reply: Vec<T>) -> Result<Vec<T>, RemoteError> {
    if reply.len() == asked {
        Ok(reply)
    } else {
        Err(RemoteError::Reply(format!(
            "{what}: {asked} asked, {} answered",
            reply.len()
        )))
    }
}

fn redis_error(err: redis::RedisError) -> RemoteError {
    RemoteError::Redis(Arc::new(err))
}

/// Runs `pipeline` over the keys at `0..keys.len()` once, or over a cluster once per hash slot,
/// concurrently (redis-rs sends a pipeline to one node); the replies in the order of `keys`.
async fn by_slot<T, F, Fut>(
    cluster: bool,
    keys: &[&[u8]],
    pipeline: F,
) -> Result<Vec<T>, RemoteError>
where
    F: Fn(Vec<usize>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, RemoteError>>,
{
    if !cluster {
        return pipeline((0..keys.len()).collect()).await;
    }
    let mut slots: std::collections::HashMap<redis::cluster_routing::Slot, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        slots
            .entry(redis::cluster_routing::Slot::for_key(key))
            .or_default()
            .push(i);
    }
    let replies = futures_util::future::try_join_all(slots.into_values().map(|at| {
        let reply = pipeline(at.clone());
        async move { Ok::<_, RemoteError>((at, reply.await?)) }
    }))
    .await?;
    let mut out: Vec<Option<T>> = keys.iter().map(|_| None).collect();
    for (at, reply) in replies {
        let reply = answered("a pipeline of one slot", at.len(), reply)?;
        for (i, reply) in at.into_iter().zip(reply) {
            out[i] = Some(reply);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

impl<S: RedisSource> RedisOps for S {
    fn stamp<'a>(
        &'a self,
        key: &'a [u8],
        at_us: u64,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            SCRIPTS
                .stamp
                .key(key)
                .arg(at_us)
                .arg(ttl_ms.max(1))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(redis_error)
        })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        messages: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            let mut pipe = redis::pipe();
            for message in messages {
                pipe.cmd("PUBLISH").arg(channel).arg(message).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(redis_error)
        })
    }

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
    ) -> BoxFuture<'a, Result<LeaseAnswer, RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            let reply: Vec<redis::Value> = SCRIPTS
                .acquire
                .key(key)
                .key(lease_key(key))
                .arg(token)
                .arg(ttl_ms.max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let mut reply = reply.into_iter();
            let (taken, left, value) = (reply.next(), reply.next(), reply.next());
            let value = match value {
                Some(redis::Value::BulkString(bytes)) => Some(bytes),
                _ => None,
            };
            let lease = match (taken, left) {
                (Some(redis::Value::Int(1)), _) => Lease::Acquired,
                // A lease with no TTL (written by hand, PTTL -1) or gone meanwhile: wait a
                // little.
                (_, Some(redis::Value::Int(left))) => {
                    Lease::Held(Duration::from_millis(u64::try_from(left).unwrap_or(1)))
                }
                _ => Lease::Held(Duration::from_millis(1)),
            };
            Ok((lease, value))
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

    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Option<Vec<u8>>>, RemoteError>> {
        Box::pin(async move {
            let mut conn = connect(self).await?;
            redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn read_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Read>, RemoteError>> {
        Box::pin(async move {
            let slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            by_slot(S::CLUSTER, &slices, |at| async move {
                let mut conn = connect(self).await?;
                let mut invocation = SCRIPTS.read_many.prepare_invoke();
                for &i in &at {
                    invocation.key(&keys[i]);
                }
                for &i in &at {
                    invocation.key(lease_key(&keys[i]));
                }
                let replies: Vec<redis::Value> = invocation
                    .arg(token)
                    .arg(ttl_ms.max(1))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                replies
                    .into_iter()
                    .map(|reply| match reply {
                        redis::Value::BulkString(bytes) => Ok(Read::Value(bytes)),
                        redis::Value::Int(1) => Ok(Read::Leased),
                        redis::Value::Int(0) => Ok(Read::Held),
                        other => Err(RemoteError::Reply(format!("{other:?} from a read"))),
                    })
                    .collect()
            })
            .await
        })
    }

    fn acquire_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<bool>, RemoteError>> {
        Box::pin(async move {
            let slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            by_slot(S::CLUSTER, &slices, |at| async move {
                let mut conn = connect(self).await?;
                let mut pipe = redis::pipe();
                for i in at {
                    pipe.cmd("SET")
                        .arg(lease_key(&keys[i]))
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms.max(1));
                }
                let replies: Vec<Option<String>> =
                    pipe.query_async(&mut conn).await.map_err(redis_error)?;
                Ok(replies.into_iter().map(|reply| reply.is_some()).collect())
            })
            .await
        })
    }

    fn put_many<'a>(
        &'a self,
        items: &'a [(Vec<u8>, Vec<u8>, u64)],
        token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<bool>, RemoteError>> {
        let slices: Vec<&[u8]> = items.iter().map(|(key, _, _)| key.as_slice()).collect();
        Box::pin(async move {
            by_slot(S::CLUSTER, &slices, |at| async move {
                let mut conn = connect(self).await?;
                let mut invocation = SCRIPTS.put_many.prepare_invoke();
                for &i in &at {
                    invocation.key(&items[i].0);
                }
                for &i in &at {
                    invocation.key(lease_key(&items[i].0));
                }
                invocation.arg(token.unwrap_or(""));
                for &i in &at {
                    let (_, value, ttl_ms) = &items[i];
                    invocation.arg(value).arg((*ttl_ms).max(1));
                }
                let stored: Vec<i64> = invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                Ok(stored.into_iter().map(|stored| stored == 1).collect())
            })
            .await
        })
    }

    fn release_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            by_slot(S::CLUSTER, &slices, |at| async move {
                let mut conn = connect(self).await?;
                let mut pipe = redis::pipe();
                for i in at {
                    pipe.cmd("EVAL")
                        .arg(RELEASE)
                        .arg(1)
                        .arg(lease_key(&keys[i]))
                        .arg(token);
                }
                pipe.query_async::<Vec<i64>>(&mut conn)
                    .await
                    .map_err(redis_error)
            })
            .await
            .map(drop)
        })
    }

    fn kind(&self) -> &'static str {
        std::any::type_name::<S>()
    }
}

/// The remote tier: its store, and over Redis the batcher its single-key reads share.
pub(crate) struct Remote {
    core: Arc<Core>,
    /// Over Redis: concurrent `get`s of single keys, gathered into one `MGET`.
    reads: Option<Loader<Vec<u8>, Vec<u8>, Mget>>,
}

impl std::ops::Deref for Remote {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// The single-key reads of one scheduler tick, as one `MGET` (brisk-batch's loader gathers
/// them, and runs the read on a task of its own).
struct Mget(Arc<Core>);

impl BatchFn<Vec<u8>, Vec<u8>> for Mget {
    type Error = RemoteError;

    async fn load(&self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, Vec<u8>>, RemoteError> {
        let values = self.0.get_many(keys).await?;
        Ok(keys
            .iter()
            .zip(values)
            .filter_map(|(key, value)| Some((key.clone(), value?)))
            .collect())
    }
}

impl Remote {
    /// The store, for tasks that outlive a borrow of the cache.
    pub(crate) fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }

    pub(crate) fn memory(max_bytes: u64, cache: &str) -> Self {
        Self {
            core: Arc::new(Core::memory(max_bytes, cache)),
            reads: None,
        }
    }

    pub(crate) fn redis(
        ops: Box<dyn RedisOps>,
        timeout: Duration,
        breaker: BreakerConfig,
        cache: &Arc<str>,
    ) -> Self {
        let core = Arc::new(Core::redis(ops, timeout, breaker, cache));
        let reads = Loader::builder(Mget(Arc::clone(&core)))
            .name(format!("brisk-cache:{cache}"))
            .max_batch_size(MAX_READ_BATCH)
            // Never queued behind other batches: each is bounded by the remote timeout alone.
            .max_concurrent_batches(1_024)
            .build()
            .expect("constant, valid settings");
        Self {
            core,
            reads: Some(reads),
        }
    }

    /// The bytes stored under `key`: over Redis, while the breaker is closed, in the `MGET`
    /// of the reads made at the same moment (that command bounded by the remote timeout, the
    /// wait for it by the caller's deadline); else in a `GET` of its own, through the breaker,
    /// so that a half-open breaker's probe is one read, not a batch of them.
    pub(crate) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RemoteError> {
        let Some(reads) = self.reads.as_ref().filter(|_| self.core.closed()) else {
            return self.core.get(key).await;
        };
        match reads.load(key.to_vec()).await {
            Ok(value) => Ok(value),
            Err(LoadError::Batch(err)) => Err((*err).clone()),
            Err(LoadError::Deadline(elapsed)) => Err(RemoteError::Timeout(elapsed)),
            Err(other) => Err(RemoteError::Reply(other.to_string())),
        }
    }
}

/// Keys in one coalesced `MGET` at most: more wait for the next.
const MAX_READ_BATCH: usize = 256;

/// The remote tier with its timeout, breaker and metrics.
pub(crate) struct Core {
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

impl Core {
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

    /// Whether the breaker is closed (true without Redis).
    fn closed(&self) -> bool {
        match &self.store {
            Store::Redis { breaker, .. } => breaker.is_closed(),
            Store::Memory(_) => true,
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

    /// Reads many keys in one round trip (one per hash slot on a cluster), taking the lease
    /// of each missing one for `token`. Without Redis no lease is taken: a missing key is
    /// [`Read::Leased`], as this process's loads are single-flight already.
    pub(crate) async fn read_many(
        &self,
        keys: &[Vec<u8>],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<Read>, RemoteError> {
        match &self.store {
            Store::Memory(map) => {
                let now = Instant::now();
                Ok(keys
                    .iter()
                    .map(|key| {
                        map.get(key)
                            .filter(|stored| now < stored.expires)
                            .map_or(Read::Leased, |stored| Read::Value(stored.bytes.clone()))
                    })
                    .collect())
            }
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                let read = self
                    .call(Op::Get, self.timeout, ops.read_many(keys, token, ttl_ms))
                    .await?;
                answered("a read of keys", keys.len(), read)
            }
        }
    }

    /// The leases of many keys, in one round trip: which were taken. Without Redis, all.
    pub(crate) async fn acquire_many(
        &self,
        keys: &[Vec<u8>],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>, RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(vec![true; keys.len()]),
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                let taken = self
                    .call(
                        Op::Lease,
                        self.timeout,
                        ops.acquire_many(keys, token, ttl_ms),
                    )
                    .await?;
                Ok(if taken.len() == keys.len() {
                    taken
                } else {
                    vec![false; keys.len()]
                })
            }
        }
    }

    /// Stores many `(key, bytes, ttl)` in one round trip, fenced by `token` if given: whether
    /// each was stored.
    pub(crate) async fn put_many(
        &self,
        items: &[(Vec<u8>, Vec<u8>, Duration)],
        token: Option<&str>,
        within: Duration,
    ) -> Result<Vec<bool>, RemoteError> {
        match &self.store {
            Store::Memory(map) => {
                let now = Instant::now();
                for (key, bytes, ttl) in items {
                    map.insert(
                        key.clone(),
                        Arc::new(Stored {
                            bytes: bytes.clone(),
                            expires: now + *ttl,
                        }),
                    );
                }
                Ok(vec![true; items.len()])
            }
            Store::Redis { ops, .. } => {
                let items: Vec<_> = items
                    .iter()
                    .map(|(key, bytes, ttl)| {
                        (key.clone(), bytes.clone(), crate::clock::millis(*ttl))
                    })
                    .collect();
                let stored = self
                    .call(Op::Set, within, ops.put_many(&items, token))
                    .await?;
                answered("a pipeline of writes", items.len(), stored)
            }
        }
    }

    pub(crate) async fn release_many(&self, keys: &[Vec<u8>], token: &str) {
        if let Store::Redis { ops, .. } = &self.store
            && !keys.is_empty()
        {
            let _ = self
                .call(Op::Lease, self.timeout, ops.release_many(keys, token))
                .await;
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

    /// Takes the key's lease if it is free, and reads the key in the same step.
    pub(crate) async fn acquire(
        &self,
        key: &[u8],
        token: &str,
        ttl: Duration,
    ) -> Result<LeaseAnswer, RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok((Lease::Acquired, None)),
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

    /// `MGET` of `keys`, through the breaker (nothing without Redis: no other instance wrote).
    pub(crate) async fn get_many(
        &self,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(vec![None; keys.len()]),
            Store::Redis { ops, .. } => {
                let values = self.call(Op::Get, self.timeout, ops.get_many(keys)).await?;
                answered("MGET", keys.len(), values)
            }
        }
    }

    /// Records a tag's time (see [`RedisOps::stamp`]).
    pub(crate) async fn stamp(
        &self,
        key: &[u8],
        at_us: u64,
        ttl: Duration,
    ) -> Result<(), RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Redis { ops, .. } => {
                let ttl_ms = crate::clock::millis(ttl);
                self.call(Op::Set, self.timeout, ops.stamp(key, at_us, ttl_ms))
                    .await
            }
        }
    }

    /// Whether this is the in-memory store, with no other instance.
    pub(crate) fn in_memory(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// Publishes `messages` on `channel` (nothing without Redis: no one else could hear).
    pub(crate) async fn publish(
        &self,
        channel: &str,
        messages: &[Vec<u8>],
    ) -> Result<(), RemoteError> {
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Redis { ops, .. } => {
                self.call(Op::Set, self.timeout, ops.publish(channel, messages))
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
        self.core.fmt(f)
    }
}

impl fmt::Debug for Core {
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
