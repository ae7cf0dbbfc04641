//! `CacheBuilder`: every setting, checked once in `build()`.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use brisk_pool::redis_source::RedisSource;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::breaker::BreakerConfig;
use crate::cache::{Cache, Config, Inner, ReadThrough, Tagger};
use crate::codec::Codec;
use crate::error::BuildError;
use crate::invalidation::{self, Invalidation, Listener};
use crate::key::{self, CacheKey};
use crate::local::LocalTier;
use crate::remote::{RedisOps, Remote};

/// The longest TTL, stale window or negative TTL accepted: one year.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);
/// The longest loader or remote timeout accepted: one hour.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);

/// Settings of a [`Cache`]; start with [`Cache::builder`]. Every setter consumes and returns
/// the builder; [`build`](Self::build) checks them all and refuses what it cannot honour.
///
/// | setting | default |
/// |---|---|
/// | [`ttl`](Self::ttl) | 60 s |
/// | [`ttl_jitter`](Self::ttl_jitter) | 0 (every entry lives exactly its TTL) |
/// | [`negative_ttl`](Self::negative_ttl) | the TTL, at most 30 s |
/// | [`stale_for`](Self::stale_for) | zero: no fail-safe |
/// | [`soft_timeout`](Self::soft_timeout) | none |
/// | [`hard_timeout`](Self::hard_timeout) | 10 s |
/// | remote tier | [`in_memory`](Self::in_memory), 64 MiB; or [`redis`](Self::redis) |
/// | [`remote_timeout`](Self::remote_timeout) | 100 ms |
/// | [`breaker`](Self::breaker) | 5 failures in a row open it for 500 ms |
/// | [`local`](Self::local) | none |
/// | [`invalidation`](Self::invalidation) | none: a local tier sees other instances' writes after its TTL |
/// | [`codec`](Self::codec) | MessagePack |
/// | [`max_value_size`](Self::max_value_size) | 1 MiB |
/// | [`max_key_len`](Self::max_key_len) | 1,024 bytes |
#[must_use]
pub struct CacheBuilder<K, V> {
    name: String,
    config: Config,
    local: Option<LocalTier<K, V>>,
    redis: Option<Box<dyn RedisOps>>,
    /// Whether that source is a cluster.
    cluster: bool,
    memory_bytes: u64,
    breaker: BreakerConfig,
    loader: Option<ReadThrough<K, V>>,
    invalidation: Option<Invalidation>,
    tagger: Option<Tagger<K, V>>,
}

impl<K, V> CacheBuilder<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            config: Config::default(),
            local: None,
            redis: None,
            cluster: false,
            memory_bytes: 64 << 20,
            breaker: BreakerConfig::default(),
            loader: None,
            invalidation: None,
            tagger: None,
        }
    }

    /// How long a loaded or set value is fresh.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// Takes up to this fraction of the TTL off each entry at random, so entries loaded together
    /// do not all expire together. In `[0, 1)`.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.config.jitter = fraction;
        self
    }

    /// How long a loader's "none" (`Ok(None)`) is cached; zero caches no absence. At most the TTL.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.negative_ttl = Some(ttl);
        self
    }

    /// How long past its TTL a value may still be served when its reload fails, passes the soft
    /// timeout, or the caller's deadline comes first (fail-safe). The remote tier keeps values
    /// this much longer than their TTL.
    pub fn stale_for(mut self, window: Duration) -> Self {
        self.config.stale_for = window;
        self
    }

    /// With a stale value at hand, wait this long for a reload before serving the stale value;
    /// the reload goes on in the background and fills the cache. Below the hard timeout.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.config.soft_timeout = Some(timeout);
        self
    }

    /// Refreshes hot keys before they expire, in the background (probabilistic early
    /// expiration, `XFetch`): a hit on a value that took `delta` to load refreshes it when
    /// `now + delta × beta × −ln(rand())` reaches its expiry, so the more often a key is read
    /// and the slower its load, the earlier one read starts a reload — one per key at a time,
    /// across processes too over Redis (the lease) — while every caller gets the cached value at
    /// once. `beta` 1 is the usual; above 1 refreshes earlier. Off unless set. Values given by
    /// [`set`](crate::Cache::set) took nothing to load and are never refreshed early.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.config.early_beta = Some(beta);
        self
    }

    /// The most a load may take: past it the loader is dropped and waiters get
    /// [`Error::LoadTimeout`](crate::Error::LoadTimeout) (or a stale value).
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.config.hard_timeout = timeout;
        self
    }

    /// Keeps entries in this process as well, in front of the remote tier.
    pub fn local(mut self, tier: LocalTier<K, V>) -> Self {
        self.local = Some(tier);
        self
    }

    /// The remote tier is Redis, reached through `source` (a [`Multiplexed`] set of connections,
    /// an instrumented deadpool-redis or bb8-redis pool, or a cluster connection).
    ///
    /// [`Multiplexed`]: brisk_pool::redis_source::Multiplexed
    pub fn redis<S: RedisSource>(mut self, source: S) -> Self {
        self.redis = Some(Box::new(source));
        self.cluster = S::CLUSTER;
        self
    }

    /// Tags every stored entry (a load's, a set's, a write-through's; an absence is `None`)
    /// with what `tags` returns for it: at most 32 tags, each 1 to 256 bytes.
    /// [`Cache::invalidate_tag`] then makes every entry of a tag a miss. A tag function that
    /// panics or returns a refused tag keeps the entry out of the remote tier (a set fails with
    /// [`Error::Tag`](crate::Error::Tag); a load's value still answers its callers).
    pub fn tags(
        mut self,
        tags: impl Fn(&K, Option<&V>) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.tagger = Some(Arc::new(tags));
        self
    }

    /// Keep the local tier coherent with other instances' writes, through a backplane or
    /// Redis's tracking (see [`Invalidation`] for which to choose). The cache opens one more
    /// connection for it, on the runtime `build` is called on, and reopens it when lost. The
    /// local tier serves only while that connection hears: until it is set up and while it is
    /// lost, reads go to Redis, and each set-up and each loss empties the local tier. Needs
    /// [`redis`](Self::redis).
    ///
    /// ```no_run
    /// use brisk_cache::{Cache, Invalidation, LocalTier};
    /// use brisk_pool::redis_source::Multiplexed;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let url = "redis://127.0.0.1:6379";
    /// let users: Cache<u64, String> = Cache::builder("users")
    ///     .redis(Multiplexed::connect(url).await?)
    ///     .local(LocalTier::entries(10_000))
    ///     .invalidation(Invalidation::tracking(Multiplexed::builder(url)))
    ///     .build()?;
    /// # drop(users);
    /// # Ok(())
    /// # }
    /// ```
    pub fn invalidation(mut self, invalidation: Invalidation) -> Self {
        self.invalidation = Some(invalidation);
        self
    }

    /// The remote tier is a map in this process of at most `max_bytes` of keys and stored values
    /// (the default, 64 MiB, when no Redis is given): for tests, examples, and services of one
    /// process. Ignored once [`redis`](Self::redis) is set.
    pub fn in_memory(mut self, max_bytes: u64) -> Self {
        self.memory_bytes = max_bytes;
        self
    }

    /// The most one Redis command may take (and never more than the request's deadline); past it
    /// the read goes on as a miss.
    pub fn remote_timeout(mut self, timeout: Duration) -> Self {
        self.config.remote_timeout = timeout;
        self
    }

    /// When the circuit breaker in front of Redis opens, and for how long.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The serde format of stored values.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.config.codec = codec;
        self
    }

    /// Values whose envelope is larger than this are not stored remotely (counted in
    /// `brisk_cache_oversize_total`); the call still succeeds and the local tier keeps them.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.config.max_value_size = bytes;
        self
    }

    /// Keys whose encoding is longer than this are refused with
    /// [`KeyError::TooLong`](crate::KeyError::TooLong).
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.config.max_key_len = bytes;
        self
    }

    /// Compresses values whose serialized form is longer than `bytes` with LZ4 (feature `lz4`).
    #[cfg(feature = "lz4")]
    pub fn compress_above(mut self, bytes: usize) -> Self {
        self.config.compress_above = Some(bytes);
        self
    }

    /// Registers the loader [`Cache::get`] uses on a miss (read-through): it gets the key and
    /// returns `Ok(Some(value))`, `Ok(None)` for "there is none" (cached for the negative TTL),
    /// or an error.
    pub fn loader<F, Fut, E>(mut self, loader: F) -> Self
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.loader = Some(Arc::new(move |key| {
            loader(key)
                .map(|result| result.map_err(crate::cache::share))
                .boxed()
        }));
        self
    }

    /// Checks every setting and builds the cache.
    ///
    /// # Errors
    ///
    /// A [`BuildError`] naming the first setting it cannot honour.
    pub fn build(self) -> Result<Cache<K, V>, BuildError> {
        let Self {
            name,
            mut config,
            local,
            redis,
            memory_bytes,
            cluster,
            breaker,
            loader,
            invalidation,
            tagger,
        } = self;
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid_name {
            return Err(BuildError::Name(name));
        }
        let ttl = config.ttl;
        within("ttl", ttl, MAX_TTL)?;
        if !(0.0..1.0).contains(&config.jitter) {
            return Err(BuildError::Jitter(config.jitter.to_string()));
        }
        let negative = *config
            .negative_ttl
            .get_or_insert(ttl.min(Duration::from_secs(30)));
        if negative > ttl {
            return Err(BuildError::AboveTtl {
                setting: "negative_ttl",
                value: negative,
                ttl,
            });
        }
        if config.stale_for > MAX_TTL {
            return Err(BuildError::TooLong {
                setting: "stale_for",
                value: config.stale_for,
                max: MAX_TTL,
            });
        }
        if let Some(beta) = config.early_beta
            && !(beta > 0.0 && beta <= 100.0)
        {
            return Err(BuildError::EarlyRefresh(beta.to_string()));
        }
        within("hard_timeout", config.hard_timeout, MAX_TIMEOUT)?;
        within("remote_timeout", config.remote_timeout, MAX_TIMEOUT)?;
        if let Some(soft) = config.soft_timeout {
            within("soft_timeout", soft, MAX_TIMEOUT)?;
            if soft >= config.hard_timeout {
                return Err(BuildError::SoftAboveHard {
                    soft,
                    hard: config.hard_timeout,
                });
            }
        }
        if breaker.failures == 0 {
            return Err(BuildError::Zero("breaker failures"));
        }
        within("breaker open_for", breaker.open_for, MAX_TIMEOUT)?;
        if config.max_value_size == 0 {
            return Err(BuildError::Zero("max_value_size"));
        }
        if config.max_key_len == 0 {
            return Err(BuildError::Zero("max_key_len"));
        }
        if redis.is_none() && memory_bytes == 0 {
            return Err(BuildError::Zero("in_memory max_bytes"));
        }
        if let Some(tier) = &local {
            if tier.capacity == 0 {
                return Err(BuildError::Zero("local tier capacity"));
            }
            let local_ttl = tier.ttl.unwrap_or(ttl);
            if local_ttl.is_zero() {
                return Err(BuildError::Zero("local tier ttl"));
            }
            if local_ttl > ttl {
                return Err(BuildError::AboveTtl {
                    setting: "local tier ttl",
                    value: local_ttl,
                    ttl,
                });
            }
        }
        let listening = match invalidation {
            Some(invalidation) => {
                if redis.is_none() {
                    return Err(BuildError::Invalidation(
                        "needs Redis: give the cache a source with .redis(...)",
                    ));
                }
                invalidation::check(invalidation.mode, cluster)
                    .map_err(BuildError::Invalidation)?;
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    BuildError::Invalidation(
                        "build the cache on a Tokio runtime: its connection runs there",
                    )
                })?;
                let (listener, outbox) =
                    Listener::new(invalidation.mode, &name, key::prefix(&name));
                Some((Arc::new(listener), outbox, invalidation.connection, runtime))
            }
            None => None,
        };
        let name: Arc<str> = name.into();
        let remote = match redis {
            Some(ops) => Remote::redis(ops, config.remote_timeout, breaker, &name),
            None => Remote::memory(memory_bytes, &name),
        };
        let core = remote.core();
        let listener = listening
            .as_ref()
            .map(|(listener, ..)| Arc::clone(listener));
        let inner = Arc::new(Inner::new(
            name, config, local, remote, loader, listener, tagger,
        ));
        if let Some((listener, outbox, connection, runtime)) = listening {
            invalidation::start(listener, &inner, connection, outbox, core, &runtime);
        }
        Ok(Cache::from_inner(inner))
    }
}

fn within(setting: &'static str, value: Duration, max: Duration) -> Result<(), BuildError> {
    if value.is_zero() {
        return Err(BuildError::Zero(setting));
    }
    if value > max {
        return Err(BuildError::TooLong {
            setting,
            value,
            max,
        });
    }
    Ok(())
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("local", &self.local)
            .field("redis", &self.redis.as_ref().map(|ops| ops.kind()))
            .field("breaker", &self.breaker)
            .field("loader", &self.loader.is_some())
            .field("invalidation", &self.invalidation.as_ref().map(|i| i.mode))
            .field("tags", &self.tagger.is_some())
            .finish_non_exhaustive()
    }
}
