//! `Cache`: the read path, single-flight loads, and the writes.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use brisk_core::deadline;
use brisk_metrics::catalog::{
    CACHE_DECODE_FAILURES, CACHE_EARLY_REFRESHES, CACHE_LEASES, CACHE_LOAD_DURATION, CACHE_LOADS,
    CACHE_LOCAL_ENTRIES, CACHE_OVERSIZE, CACHE_REQUESTS,
};
use brisk_metrics::{Counter, Histogram};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::builder::CacheBuilder;
use crate::clock::Clock;
use crate::codec::Codec;
use crate::early::Early;
use crate::envelope::{self, DecodeError, Format, Meta};
use crate::error::{Error, RemoteError, SharedError};
use crate::invalidation::{Heard, Listener};
use crate::key::{self, CacheKey};
use crate::local::{Local, LocalTier, Lookup};
use crate::remote::{Lease, Read, Remote};
use crate::tags::{self, Tags, Trust};

/// The function that gives each stored entry its tags.
pub(crate) type Tagger<K, V> = Arc<dyn Fn(&K, Option<&V>) -> Vec<String> + Send + Sync>;

/// The loader registered for read-through.
pub(crate) type ReadThrough<K, V> =
    Arc<dyn Fn(K) -> BoxFuture<'static, Result<Option<V>, SharedError>> + Send + Sync>;

pub(crate) fn share(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SharedError {
    Arc::from(err.into())
}

/// The settings `build()` checked.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) stale_for: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Duration,
    pub(crate) remote_timeout: Duration,
    pub(crate) codec: Codec,
    pub(crate) max_value_size: usize,
    pub(crate) max_key_len: usize,
    pub(crate) compress_above: Option<usize>,
    pub(crate) early_beta: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            jitter: 0.0,
            negative_ttl: None,
            stale_for: Duration::ZERO,
            soft_timeout: None,
            hard_timeout: Duration::from_secs(10),
            remote_timeout: Duration::from_millis(100),
            codec: Codec::MessagePack,
            max_value_size: 1 << 20,
            max_key_len: 1_024,
            compress_above: None,
            early_beta: None,
        }
    }
}

/// A two-tier cache of `V` by `K`: an optional in-process tier in front of Redis (or of an
/// in-memory stand-in). Cheap to clone; clones share everything. See the [crate docs](crate).
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

pub(crate) struct Inner<K, V> {
    name: Arc<str>,
    prefix: Vec<u8>,
    config: Config,
    format: Format,
    clock: Clock,
    local: Option<Local<K, V>>,
    remote: Remote,
    loader: Option<ReadThrough<K, V>>,
    flights: KeyMap<K, Arc<Flight<V>>>,
    /// Bumped by every write to a key of its stripe: a remote read that started before one does
    /// not fill the local tier with what it read. Striped so that writes to other keys rarely
    /// keep a read from filling the local tier.
    epochs: [AtomicU64; STRIPES],
    /// Bumped by every write or invalidation of a key of its stripe, and not by flushes: a load
    /// detached from the map by a flush stores its value only if no write came since it began
    /// (a write no longer finds it to cut it off).
    written: [AtomicU64; STRIPES],
    /// The keys being written now, each with the turn its writes take and how many writes hold
    /// or wait for it (see `turn`).
    writes: KeyMap<K, (Arc<tokio::sync::Mutex<()>>, usize)>,
    stripes: foldhash::fast::RandomState,
    metrics: Metrics,
    /// With invalidation: whether the local tier hears other instances' writes now.
    listener: Option<Arc<Listener>>,
    /// Bumped by every flush of the local tier (an invalidation connection's, a tag's, a
    /// clear's): a load that began before one keeps nothing locally.
    flushes: AtomicU64,
    tags: Tags,
    tagger: Option<Tagger<K, V>>,
}

/// A map keyed by the user's keys, behind a lock: only keys in flight (being loaded or written).
type KeyMap<K, T> = Mutex<HashMap<K, T, foldhash::fast::RandomState>>;

/// Stripes of keys for the write epochs.
const STRIPES: usize = 64;

/// Where a value was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Local,
    Remote,
}

/// A value past its freshness that a failed or slow load may serve.
type Stale<V> = Option<(Option<V>, Tier)>;

/// One load in progress, shared by every caller that misses the key meanwhile.
struct Flight<V> {
    started: Instant,
    /// Started early by a hit, while the value was still fresh: readers go on reading it until
    /// it expires, and only a miss joins this load.
    early: bool,
    /// What the caller that started it had as a stale value.
    stale: Stale<V>,
    outcome: OnceLock<Result<Option<V>, Error>>,
    done: Notify,
    /// A write to the key came after the load began: its result goes to its waiters only.
    superseded: AtomicBool,
    /// The load is writing its value to Redis: a write to the key waits for it to land, so
    /// that the write lands last. (Set before `superseded` is read, read after it is set: one of
    /// the two sides always sees the other.)
    writing: AtomicBool,
    /// The load has written Redis, or never will.
    landed: AtomicBool,
    landing: Notify,
    /// The flush count when it began (see `Inner::flushes`): a flush since detaches it.
    heard: u64,
    /// Its key's stripe in `Inner::written` when it began.
    written: u64,
}

impl<V: Clone> Flight<V> {
    fn new(stale: Stale<V>, early: bool, heard: u64, written: u64) -> Self {
        Self {
            heard,
            written,
            started: Instant::now(),
            early,
            stale,
            outcome: OnceLock::new(),
            done: Notify::new(),
            superseded: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            landed: AtomicBool::new(false),
            landing: Notify::new(),
        }
    }

    fn finish(&self, outcome: Result<Option<V>, Error>) {
        if self.outcome.set(outcome).is_ok() {
            self.done.notify_waiters();
        }
    }

    fn land(&self) {
        self.landed.store(true, Ordering::Release);
        self.landing.notify_waiters();
    }

    async fn landed(&self) {
        until(&self.landing, || {
            self.landed.load(Ordering::Acquire).then_some(())
        })
        .await;
    }

    async fn wait(&self) -> Result<Option<V>, Error> {
        until(&self.done, || self.outcome.get().cloned()).await
    }
}

/// Waits on `notify` until `ready` gives a value; registered before each look, so a wake-up
/// between the look and the wait is not lost.
async fn until<T>(notify: &Notify, mut ready: impl FnMut() -> Option<T>) -> T {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(value) = ready() {
            return value;
        }
        notified.await;
    }
}

struct Metrics {
    local_hit: Counter,
    local_miss: Counter,
    local_stale: Counter,
    remote_hit: Counter,
    remote_miss: Counter,
    remote_error: Counter,
    remote_stale: Counter,
    loaded: Counter,
    load_none: Counter,
    load_error: Counter,
    load_timeout: Counter,
    load_panic: Counter,
    load_duration: Histogram,
    decode: [Counter; DecodeError::REASONS.len()],
    oversize: Counter,
    early_refreshes: Counter,
    lease_acquired: Counter,
    lease_waited: Counter,
    lease_fenced: Counter,
}

impl Metrics {
    fn new(cache: &str) -> Self {
        let request = |tier: &'static str, outcome: &'static str| {
            CACHE_REQUESTS.counter(&[
                ("cache", cache.to_owned()),
                ("tier", tier.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
        };
        let load = |outcome: &'static str| {
            CACHE_LOADS.counter(&[("cache", cache.to_owned()), ("outcome", outcome.to_owned())])
        };
        let lease = |outcome: &'static str| {
            CACHE_LEASES.counter(&[("cache", cache.to_owned()), ("outcome", outcome.to_owned())])
        };
        Self {
            local_hit: request("local", "hit"),
            local_miss: request("local", "miss"),
            local_stale: request("local", "stale"),
            remote_hit: request("remote", "hit"),
            remote_miss: request("remote", "miss"),
            remote_error: request("remote", "error"),
            remote_stale: request("remote", "stale"),
            loaded: load("loaded"),
            load_none: load("none"),
            load_error: load("error"),
            load_timeout: load("timeout"),
            load_panic: load("panic"),
            load_duration: CACHE_LOAD_DURATION.histogram(&[("cache", cache.to_owned())]),
            decode: DecodeError::REASONS.map(|reason| {
                CACHE_DECODE_FAILURES
                    .counter(&[("cache", cache.to_owned()), ("reason", reason.to_owned())])
            }),
            oversize: CACHE_OVERSIZE.counter(&[("cache", cache.to_owned())]),
            early_refreshes: CACHE_EARLY_REFRESHES.counter(&[("cache", cache.to_owned())]),
            lease_acquired: lease("acquired"),
            lease_waited: lease("waited"),
            lease_fenced: lease("fenced"),
        }
    }

    /// What a load's run (bounded by `hard`, panics caught) came to, counted: a success under
    /// the counter `loaded` picks for its value.
    fn outcome<'a, T>(
        &'a self,
        run: Result<std::thread::Result<Result<T, SharedError>>, deadline::Elapsed>,
        hard: Duration,
        loaded: impl FnOnce(&T) -> &'a Counter,
    ) -> Result<T, Error> {
        match run {
            Ok(Ok(Ok(value))) => {
                loaded(&value).increment(1);
                Ok(value)
            }
            Ok(Ok(Err(err))) => {
                self.load_error.increment(1);
                Err(Error::Load(err))
            }
            Ok(Err(panic)) => {
                self.load_panic.increment(1);
                Err(Error::Panicked {
                    message: envelope::panic_message(&*panic).into(),
                })
            }
            Err(_) => {
                self.load_timeout.increment(1);
                Err(Error::LoadTimeout { after: hard })
            }
        }
    }

    fn served_stale(&self, tier: Tier) {
        match tier {
            Tier::Local => self.local_stale.increment(1),
            Tier::Remote => self.remote_stale.increment(1),
        }
    }

    fn decode_failure(&self, err: &DecodeError) {
        self.decode[err.index()].increment(1);
    }
}

/// How often a load waiting on another process's lease looks for its value: first after this,
/// then twice as long each time, up to [`MAX_LEASE_POLL`].
const FIRST_LEASE_POLL: Duration = Duration::from_millis(2);
const MAX_LEASE_POLL: Duration = Duration::from_millis(50);

/// What a load found when it asked for its key's lease.
enum Leased<V> {
    /// It holds the lease (this token): its value is stored only while the lease stands.
    Held(String),
    /// Another process loaded the key and stored it meanwhile.
    Found(Option<V>, Instant, Instant, Option<Early>),
    /// No lease to be had (no Redis, Redis failing, or a lease that never freed): it loads and
    /// stores as without leases.
    Unfenced,
}

/// What the remote tier had.
enum Found<V> {
    /// The value, when it turns stale, when it leaves the stale window, and its early refresh.
    Fresh(Option<V>, Instant, Instant, Option<Early>),
    Stale(Option<V>),
    Nothing,
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Starts a cache named `name`: 1 to 64 characters of `A-Z a-z 0-9 _ - .`. The name
    /// prefixes its Redis keys (`{brisk:<name>:1:…}`) and labels its metrics, so two caches of
    /// different value types need different names.
    pub fn builder(name: &str) -> CacheBuilder<K, V> {
        CacheBuilder::new(name)
    }

    pub(crate) fn from_inner(inner: Arc<Inner<K, V>>) -> Self {
        Self { inner }
    }

    /// Whether the local tier is kept coherent right now: the cache's
    /// [`invalidation`](CacheBuilder::invalidation) connection is set up and has not been lost
    /// since. While it is `false` the local tier is bypassed. Always `false` for a cache
    /// without invalidation.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        self.inner.listener.as_ref().is_some_and(|l| l.listening())
    }

    /// The cache's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Cache-aside: the value of `key` from the cache, or from `load` on a miss (then stored).
    ///
    /// `load` runs at most once per key at a time in this process, however many callers miss
    /// together: it runs on its own task, so a caller that is dropped or whose deadline passes
    /// does not stop it for the others, and what it loads fills the cache. `Ok(None)` from it is
    /// "there is none", cached for the negative TTL. A `load` that fails, panics or passes the
    /// hard timeout is an error to every waiter, unless a stale value within the stale window is
    /// at hand: that value is served instead. The wait is bounded by the request's deadline.
    ///
    /// # Errors
    ///
    /// [`Error::Load`], [`Error::Panicked`], [`Error::LoadTimeout`] (each only without a stale
    /// value), [`Error::Deadline`], [`Error::Key`], [`Error::NoRuntime`]. A remote tier that is
    /// down, slow or holds bad bytes is never an error here: the read goes on to `load`.
    pub async fn get_or_load<F, E>(&self, key: &K, load: F) -> Result<Option<V>, Error>
    where
        F: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // A local hit is ready at once: without this, a task reading hits in a loop would never
        // yield, and keep the tasks of its worker thread (the connection that brings
        // invalidations among them) from running. tokio's own resources take part the same way.
        tokio::task::consume_budget().await;
        let stale = match self.inner.local_first(key) {
            Ok((hit, false)) => return Ok(hit),
            Ok((hit, true)) => {
                let load = move || load.map(|result| result.map_err(share));
                self.inner.refresh_early(key, load);
                return Ok(hit);
            }
            Err(stale) => stale,
        };
        // The miss path lives in its own allocation, so the future of a hit stays small.
        Box::pin(
            self.inner
                .fetch(key, stale, move || load.map(|result| result.map_err(share))),
        )
        .await
    }

    /// Read-through with the builder's [`loader`](CacheBuilder::loader): as
    /// [`get_or_load`](Self::get_or_load) with it. Without a registered loader: the fresh value
    /// in the cache, if there is one, and nothing is loaded.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load); without a loader only [`Error::Key`].
    pub async fn get(&self, key: &K) -> Result<Option<V>, Error> {
        tokio::task::consume_budget().await; // as in `get_or_load`
        let stale = match self.inner.local_first(key) {
            Ok((hit, refresh)) => {
                if refresh && let Some(loader) = &self.inner.loader {
                    let loader = Arc::clone(loader);
                    self.inner.refresh_early(key, move || loader(key.clone()));
                }
                return Ok(hit);
            }
            Err(stale) => stale,
        };
        match &self.inner.loader {
            Some(loader) => {
                let loader = Arc::clone(loader);
                Box::pin(self.inner.fetch(key, stale, move || loader(key.clone()))).await
            }
            None => Box::pin(self.inner.peek(key)).await,
        }
    }

    /// Stores `value` under `key` in both tiers, in place of any load of the key in progress.
    ///
    /// Writes of one key take turns, so both tiers end with the last: this one waits for those
    /// ahead of it (at most the remote timeout), then writes Redis (at most the remote timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Remote`] when the remote tier may still hold what it held before (it refused
    /// both the write and the removal, or the turn did not come in time: the local entry is then
    /// dropped); [`Error::Key`]; [`Error::Encode`].
    pub async fn set(&self, key: &K, value: V) -> Result<(), Error> {
        self.inner.store(key, Some(value)).await
    }

    /// Removes `key` from both tiers; a load of it in progress still answers its waiters but
    /// stores nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Remote`] when Redis could not be told (the local entry is gone; other processes
    /// may serve the old value until its TTL ends); [`Error::Key`].
    pub async fn invalidate(&self, key: &K) -> Result<(), Error> {
        let rkey = self.inner.redis_key(key)?;
        self.inner.remove(key, &rkey).await
    }

    /// Makes every entry tagged `tag` (by the [`tags`](CacheBuilder::tags) function) a miss
    /// from now on: in this instance at once; in the others at their next remote read of such
    /// an entry with an [`invalidation`](CacheBuilder::invalidation) connection, else within
    /// a second. No entry is visited: Redis keeps the time of the tag's invalidation, and an
    /// entry made before it is a miss. Every instance's local tier is emptied (this one's at
    /// once; the others' through the invalidation connection, or after their local TTL).
    ///
    /// Loads under way when it is called count as made before it: what they store is a miss.
    /// Times come from each instance's clock, so keep the clocks in step (NTP): an instance
    /// whose clock runs behind stamps entries that look older than they are.
    ///
    /// ```
    /// use brisk_cache::Cache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), brisk_cache::Error> {
    /// // Posts by id, each tagged with its author.
    /// let posts: Cache<u64, (u64, String)> = Cache::builder("posts")
    ///     .tags(|_id, post: Option<&(u64, String)>| {
    ///         post.map(|(author, _)| vec![format!("author:{author}")]).unwrap_or_default()
    ///     })
    ///     .build()
    ///     .expect("valid settings");
    /// posts.set(&1, (42, "Hello".to_owned())).await?;
    /// posts.set(&2, (7, "Hi".to_owned())).await?;
    /// posts.invalidate_tag("author:42").await?;
    /// assert_eq!(posts.get(&1).await?, None);
    /// assert!(posts.get(&2).await?.is_some());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Tag`] for an empty tag or one above 256 bytes; [`Error::Remote`] when Redis
    /// could not record it (this instance still misses such entries, until it reads the tag's
    /// time from Redis again).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), Error> {
        Tags::check(tag)?;
        self.inner.invalidate_stamp(tag).await
    }

    /// Makes every entry of the cache a miss from now on, in every instance, as
    /// [`invalidate_tag`](Self::invalidate_tag) does for the entries of one tag: one write,
    /// whatever the number of entries, and safe on a cluster (no `SCAN`, no `KEYS`).
    ///
    /// # Errors
    ///
    /// [`Error::Remote`] when Redis could not record it.
    pub async fn clear(&self) -> Result<(), Error> {
        self.inner.invalidate_stamp(tags::CLEAR).await
    }

    /// Write-through: runs `write` (the write to the source of truth) and, if it succeeded,
    /// stores `value` under `key`. If `write` fails, the cache is not touched. If the cache cannot
    /// be updated, the key is removed instead, so no old value survives the write; only when
    /// Redis refuses that too (or the write's turn on the key, see [`set`](Self::set), does not
    /// come within the remote timeout) is the result [`Error::Remote`].
    ///
    /// Dropped before it finished (a timeout, a cancelled request), it removes the key from the
    /// local tier at once and from Redis on a task of its own: whether `write` happened is then
    /// unknown, so neither the old nor the new value is kept. Until that removal lands (one
    /// round trip), a read may still find the old value in Redis.
    ///
    /// # Errors
    ///
    /// [`Error::Write`] with the writer's error (cache untouched); [`Error::Remote`] (source
    /// written, the remote tier may serve the old value until its TTL ends); [`Error::Key`]
    /// (checked before `write` runs); [`Error::Encode`] (source written, key removed).
    pub async fn write_through<W, E>(&self, key: &K, value: V, write: W) -> Result<(), Error>
    where
        W: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let rkey = self.inner.redis_key(key)?;
        let mut unsettled = Unsettled {
            inner: Some(&self.inner),
            key,
            rkey: &rkey,
        };
        if let Err(err) = write.await {
            unsettled.inner = None; // the source refused: the cache keeps what it had
            return Err(Error::Write(share(err)));
        }
        let stored = self.inner.store(key, Some(value)).await;
        unsettled.inner = None;
        match stored {
            Ok(()) | Err(Error::Remote(_)) => stored,
            Err(err) => {
                // Not stored (the value did not serialize): nothing old may stay.
                self.inner.remove(key, &rkey).await?;
                Err(err)
            }
        }
    }
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Cache-aside for many keys at once: each key's value from the cache, and one call of
    /// `load` for the keys it misses. Results come per key, in the order of `keys` (a key
    /// given twice gets its result twice).
    ///
    /// The local tier answers what it can; the rest is read from Redis in one round trip (a
    /// script that also leases the keys it finds missing; one per hash slot on a cluster);
    /// `load` gets the keys still missing (each once), and returns the values it found — a key
    /// it leaves out is "there is none", cached for the negative TTL. Its values are stored in
    /// one more round trip. As with
    /// [`get_or_load`](Self::get_or_load), the load runs on its own task (a caller dropped
    /// does not stop it), each key it loads is a load other callers of that key join, keys
    /// whose load is already in progress are joined rather than loaded again, over Redis the
    /// loaded keys are leased (a key another process is loading is loaded here too, but stored
    /// only by that process), and a stale value within the stale window stands in for a failed
    /// load. Early refresh does not apply to batched reads.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use brisk_cache::Cache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let names: Cache<u64, String> = Cache::builder("names").build()?;
    /// names.set(&1, "Ada".to_owned()).await?;
    /// let found = names
    ///     .get_or_load_many(&[1, 2, 3], |missing: Vec<u64>| async move {
    ///         assert_eq!(missing, [2, 3]); // 1 was cached
    ///         Ok::<_, std::io::Error>(HashMap::from([(2, "Grace".to_owned())]))
    ///     })
    ///     .await;
    /// let found: Vec<Option<String>> = found.into_iter().collect::<Result<_, _>>()?;
    /// assert_eq!(found, [Some("Ada".into()), Some("Grace".into()), None]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Per key, as [`get_or_load`](Self::get_or_load): the load's error is every missing key's
    /// (without a stale value), [`Error::Key`] only that key's.
    pub async fn get_or_load_many<F, Fut, E>(
        &self,
        keys: &[K],
        load: F,
    ) -> Vec<Result<Option<V>, Error>>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Box::pin(self.inner.fetch_many(keys, move |missing| {
            load(missing).map(|result| result.map_err(share)).boxed()
        }))
        .await
    }
}

/// The batch load of `get_or_load_many`, with the user's error shared.
type BatchLoad<K, V> = BoxFuture<'static, Result<HashMap<K, V>, SharedError>>;

/// A key of a batch load: the key, its Redis key, its flight, its lease.
type BatchKey<K, V> = (K, Vec<u8>, Arc<Flight<V>>, Leasing);

/// A random token naming one load's leases.
fn lease_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// What a key of a batch load holds of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leasing {
    /// The batch's read took it.
    Mine,
    /// Another load holds it: the key is loaded here, and stored by that load.
    Others,
    /// The read found a value, stale or undecodable: the batch asks for the lease.
    Ask,
    /// No leases: no Redis, or Redis failing.
    Unfenced,
}

/// A key of `get_or_load_many` past the local tier.
struct Wanted<V> {
    /// Where in the caller's keys it stands.
    at: Vec<usize>,
    rkey: Vec<u8>,
    stale: Stale<V>,
}

/// Clears a key whose write-through was dropped midway.
struct Unsettled<
    'a,
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
> {
    inner: Option<&'a Arc<Inner<K, V>>>,
    key: &'a K,
    rkey: &'a [u8],
}

impl<K, V> Drop for Unsettled<'_, K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let Some(inner) = self.inner else { return };
        let _ = inner.forget(self.key);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = Arc::clone(inner);
            let (key, rkey) = (self.key.clone(), self.rkey.to_vec());
            runtime.spawn(async move {
                let removed = inner.remove(&key, &rkey).await;
                // A read meanwhile may have found the old value in Redis and kept it locally.
                let _ = inner.forget(&key);
                if let Err(err) = removed {
                    tracing::warn!(cache = %inner.name, %err, "a dropped write_through could not remove its key from Redis");
                }
            });
        }
    }
}

impl<K, V> Inner<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(
        name: Arc<str>,
        config: Config,
        local: Option<LocalTier<K, V>>,
        remote: Remote,
        loader: Option<ReadThrough<K, V>>,
        listener: Option<Arc<Listener>>,
        tagger: Option<Tagger<K, V>>,
    ) -> Self {
        let local = local.map(|tier| {
            let ttl = tier.ttl.unwrap_or(config.ttl);
            Local::new(
                tier,
                ttl,
                CACHE_LOCAL_ENTRIES.gauge(&[("cache", name.to_string())]),
            )
        });
        let prefix = key::prefix(&name);
        Self {
            tags: Tags::new(&prefix, remote.in_memory()),
            prefix,
            format: Format {
                codec: config.codec,
                fingerprint: envelope::fingerprint(std::any::type_name::<V>()),
                compress_above: config.compress_above,
            },
            clock: Clock::new(),
            metrics: Metrics::new(&name),
            name,
            config,
            local,
            remote,
            loader,
            flights: Mutex::default(),
            epochs: std::array::from_fn(|_| AtomicU64::new(0)),
            written: std::array::from_fn(|_| AtomicU64::new(0)),
            writes: Mutex::default(),
            stripes: foldhash::fast::RandomState::default(),
            listener,
            flushes: AtomicU64::new(0),
            tagger,
        }
    }

    /// The flush count: a load records it as it starts.
    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    /// Whether the local tier may be filled now: always, unless invalidation is on and its
    /// connection is not hearing.
    fn hearing(&self) -> bool {
        self.listener.as_ref().is_none_or(|l| l.listening())
    }

    /// Hearing, and not flushed since `flushes` was read.
    fn heard_since(&self, flushes: u64) -> bool {
        self.hearing() && self.flushes() == flushes
    }

    /// How far known tag times can be trusted now.
    fn trust(&self) -> Trust {
        match &self.listener {
            _ if self.remote.in_memory() => Trust::Always,
            Some(listener) if listener.listening() => Trust::UntilFlushed,
            Some(_) => Trust::Never,
            None => Trust::For(tags::RECHECK),
        }
    }

    /// Empties the local tier and forgets known tag times; reads and loads under way keep
    /// nothing locally, and loads under way are detached (they answer their callers and store
    /// in Redis, but no later caller joins them).
    fn flush_local(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        for epoch in &self.epochs {
            epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.flights().clear();
        self.tags.forget_all();
        if let Some(local) = &self.local {
            local.clear();
        }
    }

    /// `invalidate_tag` (`name` a tag) and `clear` (`name` empty): from now on every entry
    /// made before is a miss, here at once and in Redis for every instance.
    async fn invalidate_stamp(&self, name: &str) -> Result<(), Error> {
        let at_us = self.clock.unix_us(Instant::now());
        self.flush_local();
        self.tags.invalidated(name, at_us);
        // The time must outlive every entry made before it, plus a second of clock skew.
        let ttl = self.config.ttl + self.config.stale_for + Duration::from_secs(1);
        let stamped = self.remote.stamp(&self.tags.key(name), at_us, ttl).await;
        if let Some(listener) = &self.listener {
            listener.publish_tag(name);
        }
        stamped.map_err(Error::Remote)
    }

    /// Tells other instances that these Redis keys changed (backplane only).
    fn publish<'a>(&self, rkeys: impl IntoIterator<Item = &'a [u8]>) {
        if let Some(listener) = &self.listener {
            listener.publish_keys(rkeys);
        }
    }

    fn stripe(&self, key: &K) -> usize {
        use std::hash::BuildHasher as _;
        usize::try_from(self.stripes.hash_one(key)).unwrap_or_default() % STRIPES
    }

    fn epoch(&self, key: &K) -> &AtomicU64 {
        &self.epochs[self.stripe(key)]
    }

    fn written(&self, key: &K) -> u64 {
        self.written[self.stripe(key)].load(Ordering::Acquire)
    }

    /// Whether `flight`, loading `key`, may store what it loaded in Redis: it is not cut off
    /// by a write, and if a flush detached it, no write to its key's stripe came since.
    fn may_store(&self, key: &K, flight: &Flight<V>) -> bool {
        !flight.superseded.load(Ordering::SeqCst)
            && (flight.heard == self.flushes() || flight.written == self.written(key))
    }

    fn redis_key(&self, key: &K) -> Result<Vec<u8>, Error> {
        Ok(key::redis_key(&self.prefix, key, self.config.max_key_len)?)
    }

    /// Puts what `flight` loaded into the local tier, if there is one; `when` is when it turns
    /// stale, leaves the stale window, and now. The caller saw the flight not superseded; a
    /// write between that look and the insert takes the entry back out, since it may be older.
    fn keep_local(
        &self,
        key: &K,
        value: &Option<V>,
        (fresh_until, stale_until, now): (Instant, Instant, Instant),
        early: Option<Early>,
        flight: &Flight<V>,
    ) {
        if let Some(local) = &self.local
            && self.heard_since(flight.heard)
        {
            local.insert(
                key.clone(),
                value.clone(),
                fresh_until,
                stale_until,
                now,
                early,
            );
            if flight.superseded.load(Ordering::Acquire) || !self.heard_since(flight.heard) {
                local.remove(key);
            }
        }
    }

    /// Takes `flight` out of the map of loads in progress, unless a write already replaced it.
    fn leave(&self, key: &K, flight: &Arc<Flight<V>>) {
        let mut flights = self.flights();
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<K, Arc<Flight<V>>, foldhash::fast::RandomState>> {
        lock(&self.flights)
    }

    /// The local tier's answer: `Ok` for a fresh hit (and whether this read refreshes it
    /// early), `Err` with what a miss found there.
    #[inline]
    fn local_first(&self, key: &K) -> Result<(Option<V>, bool), Stale<V>> {
        let Some(local) = &self.local else {
            return Err(None);
        };
        let stale = match local.get(key, Instant::now()) {
            Lookup::Fresh(value, refresh) => {
                self.metrics.local_hit.increment(1);
                return Ok((value, refresh));
            }
            Lookup::Stale(value) => Some((value, Tier::Local)),
            Lookup::Absent => None,
        };
        self.metrics.local_miss.increment(1);
        Err(stale)
    }

    /// The read path past the local tier; `make` builds the load, called only on a miss.
    async fn fetch<M, L>(
        self: &Arc<Self>,
        key: &K,
        mut stale: Stale<V>,
        make: M,
    ) -> Result<Option<V>, Error>
    where
        M: FnOnce() -> L,
        L: Future<Output = Result<Option<V>, SharedError>> + Send + 'static,
    {
        let joined = self
            .flights()
            .get(key)
            .filter(|flight| !flight.early)
            .cloned();
        if let Some(flight) = joined {
            return self.wait(&flight, stale).await;
        }
        let rkey = self.redis_key(key)?;
        let epoch = self.epoch(key).load(Ordering::Acquire);
        match self.lookup(&rkey, true).await {
            Found::Fresh(value, fresh_until, stale_until, early) => {
                self.fill_local(key, &value, fresh_until, stale_until, epoch, early);
                if early.is_some_and(|early| early.due(Instant::now())) {
                    self.refresh_early(key, make);
                }
                return Ok(value);
            }
            Found::Stale(value) => stale = Some((value, Tier::Remote)),
            Found::Nothing => {}
        }
        let flight = self.start(key, rkey, stale.clone(), make, false)?;
        self.wait(&flight, stale).await
    }

    /// A read past the local tier that loads nothing: fresh values only — among them what a
    /// load has answered and is still writing to Redis. It never waits for a load.
    async fn peek(&self, key: &K) -> Result<Option<V>, Error> {
        let landing = self.flights().get(key).and_then(|flight| {
            flight
                .outcome
                .get()
                .and_then(|outcome| outcome.clone().ok())
        });
        if let Some(value) = landing {
            return Ok(value);
        }
        let rkey = self.redis_key(key)?;
        let epoch = self.epoch(key).load(Ordering::Acquire);
        match self.lookup(&rkey, true).await {
            Found::Fresh(value, fresh_until, stale_until, early) => {
                self.fill_local(key, &value, fresh_until, stale_until, epoch, early);
                Ok(value)
            }
            Found::Stale(_) | Found::Nothing => Ok(None),
        }
    }

    fn fill_local(
        &self,
        key: &K,
        value: &Option<V>,
        fresh_until: Instant,
        stale_until: Instant,
        epoch: u64,
        early: Option<Early>,
    ) {
        let stripe = self.epoch(key);
        if let Some(local) = &self.local
            && stripe.load(Ordering::Acquire) == epoch
            && self.hearing()
        {
            local.insert(
                key.clone(),
                value.clone(),
                fresh_until,
                stale_until,
                Instant::now(),
                early,
            );
            // A write between the check and the insert: take back what may now be old.
            if stripe.load(Ordering::Acquire) != epoch {
                local.remove(key);
            }
        }
    }

    /// Asks the remote tier; whatever goes wrong there is a miss, counted in the request
    /// metrics if `counted` (a load polling for another process's value is no request).
    async fn lookup(&self, rkey: &[u8], counted: bool) -> Found<V> {
        let read = self.remote.get(rkey).await;
        self.found(read, counted).await
    }

    /// What a remote read found; counted (requests, decode failures) if `counted`.
    async fn found(&self, read: Result<Option<Vec<u8>>, RemoteError>, counted: bool) -> Found<V> {
        let count = |counter: &Counter| {
            if counted {
                counter.increment(1);
            }
        };
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                count(&self.metrics.remote_miss);
                return Found::Nothing;
            }
            Err(err) => {
                count(&self.metrics.remote_error);
                tracing::debug!(cache = %self.name, %err, "remote read failed; going on as a miss");
                return Found::Nothing;
            }
        };
        match self.format.decode::<V>(&bytes) {
            Ok((_, meta))
                if self
                    .tags
                    .outdated(meta.created_us, &meta.tags, &self.remote, self.trust())
                    .await =>
            {
                // Made before an invalidation of one of its tags, or a clear.
                count(&self.metrics.remote_miss);
                Found::Nothing
            }
            Ok((value, meta)) => {
                let fresh_until = self.clock.instant(meta.fresh_until_ms);
                let stale_until = fresh_until + self.config.stale_for;
                let now = Instant::now();
                if now < fresh_until {
                    count(&self.metrics.remote_hit);
                    let took = Duration::from_micros(u64::from(meta.load_micros));
                    let early = Early::new(fresh_until, took, self.config.early_beta);
                    Found::Fresh(value, fresh_until, stale_until, early)
                } else if now < stale_until {
                    count(&self.metrics.remote_miss);
                    Found::Stale(value)
                } else {
                    count(&self.metrics.remote_miss);
                    Found::Nothing
                }
            }
            Err(err) => {
                if counted {
                    self.metrics.decode_failure(&err);
                }
                count(&self.metrics.remote_miss);
                tracing::debug!(cache = %self.name, reason = err.reason(), ?err, "a remote value did not decode; reloading it");
                Found::Nothing
            }
        }
    }

    /// `get_or_load_many`: the local tier, then one read (and lease) script, then one batch
    /// load of the misses.
    async fn fetch_many<M>(self: &Arc<Self>, keys: &[K], make: M) -> Vec<Result<Option<V>, Error>>
    where
        M: FnOnce(Vec<K>) -> BatchLoad<K, V>,
    {
        let mut out: Vec<Option<Result<Option<V>, Error>>> = keys.iter().map(|_| None).collect();
        let mut wanted: HashMap<K, Wanted<V>, foldhash::fast::RandomState> = HashMap::default();
        let mut order = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if let Some(known) = wanted.get_mut(key) {
                known.at.push(i);
                continue;
            }
            match self.local_first(key) {
                Ok((hit, _)) => out[i] = Some(Ok(hit)),
                Err(stale) => match self.redis_key(key) {
                    Ok(rkey) => {
                        wanted.insert(
                            key.clone(),
                            Wanted {
                                at: vec![i],
                                rkey,
                                stale,
                            },
                        );
                        order.push(key.clone());
                    }
                    Err(err) => out[i] = Some(Err(err)),
                },
            }
        }
        // Loads in progress are joined; the other keys are read in one round trip.
        let (mut joined, mut read) = (Vec::new(), Vec::new());
        {
            let flights = self.flights();
            for key in order {
                match flights.get(&key).filter(|flight| !flight.early) {
                    Some(flight) => joined.push((key, Arc::clone(flight))),
                    None => read.push(key),
                }
            }
        }
        let rkeys: Vec<Vec<u8>> = read.iter().map(|key| wanted[key].rkey.clone()).collect();
        let epochs: Vec<u64> = read
            .iter()
            .map(|key| self.epoch(key).load(Ordering::Acquire))
            .collect();
        // One round trip reads the keys and leases those missing (one script, over Redis).
        let token = lease_token();
        let reads: Vec<Option<Read>> = if rkeys.is_empty() {
            Vec::new()
        } else {
            match self
                .remote
                .read_many(&rkeys, &token, self.lease_ttl())
                .await
            {
                Ok(reads) => reads.into_iter().map(Some).collect(),
                Err(err) => {
                    self.metrics.remote_error.increment(rkeys.len() as u64);
                    tracing::debug!(cache = %self.name, %err, "remote read of many keys failed; going on as misses");
                    rkeys.iter().map(|_| None).collect()
                }
            }
        };
        let leases = self.remote.leases();
        let mut misses = Vec::new();
        for ((key, read), epoch) in read.into_iter().zip(reads).zip(epochs) {
            let leasing = match read {
                Some(Read::Value(bytes)) => match self.found(Ok(Some(bytes)), true).await {
                    Found::Fresh(value, fresh_until, stale_until, early) => {
                        self.fill_local(&key, &value, fresh_until, stale_until, epoch, early);
                        for &i in &wanted[&key].at {
                            out[i] = Some(Ok(value.clone()));
                        }
                        continue;
                    }
                    Found::Stale(value) => {
                        if let Some(known) = wanted.get_mut(&key) {
                            known.stale = Some((value, Tier::Remote));
                        }
                        Leasing::Ask
                    }
                    Found::Nothing => Leasing::Ask,
                },
                Some(Read::Leased) => {
                    self.metrics.remote_miss.increment(1);
                    if leases {
                        self.metrics.lease_acquired.increment(1);
                    }
                    Leasing::Mine
                }
                Some(Read::Held) => {
                    self.metrics.remote_miss.increment(1);
                    self.metrics.lease_waited.increment(1);
                    Leasing::Others
                }
                None => Leasing::Unfenced,
            };
            misses.push((key, if leases { leasing } else { Leasing::Unfenced }));
        }
        if !misses.is_empty() {
            let keys: Vec<K> = misses.iter().map(|(key, _)| key.clone()).collect();
            match self.start_many(misses, &wanted, token, make) {
                Ok(flights) => joined.extend(flights),
                Err(err) => {
                    for key in &keys {
                        for &i in &wanted[key].at {
                            out[i] = Some(Err(err.clone()));
                        }
                    }
                }
            }
        }
        for (key, flight) in joined {
            let known = &wanted[&key];
            let result = self.wait(&flight, known.stale.clone()).await;
            for &i in &known.at {
                out[i] = Some(result.clone());
            }
        }
        out.into_iter()
            .map(|result| result.unwrap_or(Err(Error::Cancelled)))
            .collect()
    }

    /// One load, on its own task, of the `misses` not being loaded already: a flight per key,
    /// which callers of single keys join too. Returns the flight of every miss. A lease taken
    /// for a key that another task of this process started loading meanwhile is handed back.
    #[allow(clippy::type_complexity)]
    fn start_many<M>(
        self: &Arc<Self>,
        misses: Vec<(K, Leasing)>,
        wanted: &HashMap<K, Wanted<V>, foldhash::fast::RandomState>,
        token: String,
        make: M,
    ) -> Result<Vec<(K, Arc<Flight<V>>)>, Error>
    where
        M: FnOnce(Vec<K>) -> BatchLoad<K, V>,
    {
        // Without a runtime the leases just taken end with their TTL.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (mut all, mut mine, mut release) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut flights = self.flights();
            for (key, leasing) in misses {
                let known = &wanted[&key];
                if let Some(flight) = flights.get(&key) {
                    all.push((key, Arc::clone(flight)));
                    if leasing == Leasing::Mine {
                        release.push(known.rkey.clone());
                    }
                    continue;
                }
                let flight = Arc::new(Flight::new(
                    known.stale.clone(),
                    false,
                    self.flushes(),
                    self.written(&key),
                ));
                flights.insert(key.clone(), Arc::clone(&flight));
                mine.push((
                    key.clone(),
                    known.rkey.clone(),
                    Arc::clone(&flight),
                    leasing,
                ));
                all.push((key, flight));
            }
        }
        if !release.is_empty() {
            // Not awaited: the leases end within one round trip, and whoever waits on them
            // takes them then.
            let (inner, token) = (Arc::clone(self), token.clone());
            runtime.spawn(async move { inner.remote.release_many(&release, &token).await });
        }
        if mine.is_empty() {
            return Ok(all);
        }
        let keys = mine.iter().map(|(key, ..)| key.clone()).collect();
        let landing = BatchLanding {
            inner: Arc::clone(self),
            flights: mine,
            token,
        };
        // A panic building the load's future is the load's panic (the landing's drop answers).
        match std::panic::catch_unwind(AssertUnwindSafe(|| make(keys))) {
            Ok(load) => {
                runtime.spawn(async move { landing.run(load).await });
            }
            Err(panic) => landing.fail(&Error::Panicked {
                message: envelope::panic_message(&*panic).into(),
            }),
        }
        Ok(all)
    }

    /// A hit drew an early refresh: starts a load of `key` in the background, unless one is in
    /// progress. The caller does not wait for it; the load fills both tiers as any load does.
    fn refresh_early<M, L>(self: &Arc<Self>, key: &K, make: M)
    where
        M: FnOnce() -> L,
        L: Future<Output = Result<Option<V>, SharedError>> + Send + 'static,
    {
        if self.flights().contains_key(key) {
            return;
        }
        let Ok(rkey) = self.redis_key(key) else {
            return;
        };
        if self.start(key, rkey, None, make, true).is_ok() {
            self.metrics.early_refreshes.increment(1);
        }
    }

    /// The TTL of a lease: a load holding it ends within its hard timeout and stores within a
    /// remote timeout, so a live holder never loses its lease to time, and a dead one (its
    /// process gone) frees the key after this long.
    fn lease_ttl(&self) -> Duration {
        self.config.hard_timeout + self.config.remote_timeout * 2
    }

    /// Before a load over Redis: takes the key's lease, or, while another process holds it,
    /// waits for the value that process stores (polling, at most one lease TTL) and takes the
    /// lease if it frees without one (the holder failed or died). Each poll reads the key and
    /// asks for the lease in one step, so a value stored since this load's first read is
    /// found, not loaded again — unless the load is an `early` refresh of a value still fresh,
    /// which takes the lease it finds free whatever is stored.
    async fn lease(&self, rkey: &[u8], early: bool) -> Leased<V> {
        if !self.remote.leases() {
            return Leased::Unfenced;
        }
        let token = lease_token();
        let ttl = self.lease_ttl();
        let give_up = Instant::now() + ttl;
        let mut pause = FIRST_LEASE_POLL;
        let mut waited = false;
        loop {
            // Redis failing: load, and store as without leases.
            let Ok((lease, stored)) = self.remote.acquire(rkey, &token, ttl).await else {
                return Leased::Unfenced;
            };
            if let Some(bytes) = stored
                && !(early && lease == Lease::Acquired)
                && let Found::Fresh(value, fresh_until, stale_until, early) =
                    self.found(Ok(Some(bytes)), false).await
            {
                if lease == Lease::Acquired {
                    let _ = self.remote.release(rkey, &token).await;
                }
                return Leased::Found(value, fresh_until, stale_until, early);
            }
            let left = match lease {
                Lease::Acquired => {
                    self.metrics.lease_acquired.increment(1);
                    return Leased::Held(token);
                }
                Lease::Held(left) => left,
            };
            if !waited {
                waited = true;
                self.metrics.lease_waited.increment(1);
            }
            if Instant::now() >= give_up {
                return Leased::Unfenced;
            }
            tokio::time::sleep(pause.min(left).max(Duration::from_millis(1))).await;
            pause = (pause * 2).min(MAX_LEASE_POLL);
        }
    }

    /// Joins the load of `key` in progress, or starts one on its own task.
    fn start<M, L>(
        self: &Arc<Self>,
        key: &K,
        rkey: Vec<u8>,
        stale: Stale<V>,
        make: M,
        early: bool,
    ) -> Result<Arc<Flight<V>>, Error>
    where
        M: FnOnce() -> L,
        L: Future<Output = Result<Option<V>, SharedError>> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // A registered loader is user code: a panic building its future is the load's panic.
        let load =
            std::panic::catch_unwind(AssertUnwindSafe(make)).map_err(|panic| Error::Panicked {
                message: envelope::panic_message(&*panic).into(),
            });
        let flight = {
            let mut flights = self.flights();
            if let Some(flight) = flights.get(key) {
                return Ok(Arc::clone(flight));
            }
            let load = load?;
            let flight = Arc::new(Flight::new(stale, early, self.flushes(), self.written(key)));
            flights.insert(key.clone(), Arc::clone(&flight));
            let landing = Landing {
                inner: Arc::clone(self),
                key: key.clone(),
                rkey,
                flight: Arc::clone(&flight),
            };
            // The landing is moved in before the first poll: if the task is dropped unpolled
            // (its runtime shutting down), its drop still answers the waiters.
            runtime.spawn(async move { landing.run(load).await });
            flight
        };
        Ok(flight)
    }

    /// Waits for a load; a stale value stands in for its failure, its soft timeout, or the
    /// caller's deadline.
    async fn wait(&self, flight: &Flight<V>, stale: Stale<V>) -> Result<Option<V>, Error> {
        if let Some(outcome) = flight.outcome.get()
            && outcome.is_ok()
        {
            return outcome.clone(); // ready: served even if the caller's budget is spent
        }
        let stale = stale.or_else(|| flight.stale.clone());
        let patience = match (&stale, self.config.soft_timeout) {
            (Some(_), Some(soft)) => {
                (flight.started + soft).saturating_duration_since(Instant::now())
            }
            _ => Duration::MAX,
        };
        let outcome = match deadline::bounded(patience, flight.wait()).await {
            Ok(outcome) => outcome,
            Err(elapsed) => Err(Error::Deadline(elapsed)),
        };
        match (outcome, stale) {
            (Ok(value), _) => Ok(value),
            (
                Err(
                    Error::Deadline(_)
                    | Error::Load(_)
                    | Error::Panicked { .. }
                    | Error::LoadTimeout { .. }
                    | Error::Cancelled,
                ),
                Some((value, tier)),
            ) => {
                self.metrics.served_stale(tier);
                Ok(value)
            }
            (Err(err), _) => Err(err),
        }
    }

    /// When a value stored now turns stale and leaves the stale window.
    fn expiry(&self, none: bool, now: Instant) -> (Instant, Instant) {
        let base = if none {
            self.config.negative_ttl.unwrap_or(self.config.ttl)
        } else {
            self.config.ttl
        };
        let ttl = if self.config.jitter > 0.0 {
            base.mul_f64(1.0 - self.config.jitter * fastrand::f64())
        } else {
            base
        };
        let fresh_until = now + ttl.max(Duration::from_millis(1));
        (fresh_until, fresh_until + self.config.stale_for)
    }

    /// The envelope of a value stored now, after a load that took `load` (zero for a set):
    /// it counts as made when the load began, so that an invalidation of one of its tags while
    /// it loaded makes it a miss.
    fn envelope(
        &self,
        key: &K,
        value: Option<&V>,
        fresh_until: Instant,
        load: Duration,
        now: Instant,
    ) -> Result<Vec<u8>, Error> {
        let meta = Meta {
            created_us: self.clock.unix_us(now.checked_sub(load).unwrap_or(now)),
            fresh_until_ms: self.clock.unix_ms(fresh_until),
            load_micros: u32::try_from(load.as_micros()).unwrap_or(u32::MAX),
            tags: self.tags_of(key, value)?,
        };
        self.format
            .encode(value, &meta)
            .map_err(|message| Error::Encode(message.into()))
    }

    /// What the tag function gives this entry, checked; its panic is an error.
    fn tags_of(&self, key: &K, value: Option<&V>) -> Result<Vec<String>, Error> {
        let Some(tagger) = &self.tagger else {
            return Ok(Vec::new());
        };
        let tags =
            std::panic::catch_unwind(AssertUnwindSafe(|| tagger(key, value))).map_err(|panic| {
                Error::Tag(
                    format!(
                        "the tag function panicked: {}",
                        envelope::panic_message(&*panic)
                    )
                    .into(),
                )
            })?;
        Tags::check_all(&tags)?;
        Ok(tags)
    }

    /// Writes stored bytes to Redis with its TTL (the fresh time plus the stale window), all of
    /// it within one remote timeout; with a load's lease `token`, only while that lease stands
    /// (`Ok(false)`: fenced, nothing written). A value too large is kept out, and what Redis
    /// held removed; a refused write is followed by a removal. An error means Redis may still
    /// hold what it held before.
    async fn put_remote(
        &self,
        rkey: &[u8],
        bytes: &[u8],
        stale_until: Instant,
        token: Option<&str>,
    ) -> Result<bool, Error> {
        let timeout = self.config.remote_timeout;
        if bytes.len() > self.config.max_value_size {
            self.metrics.oversize.increment(1);
            return self.del_remote(rkey, timeout).await.map(|()| true);
        }
        let until = Instant::now() + timeout;
        let ttl = stale_until.saturating_duration_since(Instant::now());
        let put = match token {
            Some(token) => {
                self.remote
                    .put_fenced(rkey, token, bytes, ttl, timeout)
                    .await
            }
            None => self
                .remote
                .set(rkey, bytes, ttl, timeout)
                .await
                .map(|()| true),
        };
        match put {
            Ok(stored) => {
                if stored {
                    self.publish([rkey]);
                }
                Ok(stored)
            }
            Err(err) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Remote(err));
                }
                self.del_remote(rkey, left)
                    .await
                    .map(|()| true)
                    .map_err(|_| Error::Remote(err))
            }
        }
    }

    /// Removes `rkey` from Redis within `within`.
    async fn del_remote(&self, rkey: &[u8], within: Duration) -> Result<(), Error> {
        let removed = self.remote.del(rkey, within).await.map_err(Error::Remote);
        // Even on an error: the key may have changed all the same.
        self.publish([rkey]);
        removed
    }

    /// Before a write goes to Redis: lets a load of the key that is already writing Redis
    /// finish (within one remote timeout), so that the write lands after it and wins.
    async fn after_landing(flight: Option<Arc<Flight<V>>>, until: Instant) {
        if let Some(flight) = flight {
            let left = until.saturating_duration_since(Instant::now());
            let _ = deadline::bounded(left, flight.landed()).await;
        }
    }

    /// Waits for this write's turn on its key, at most one remote timeout (`until`): writes of a
    /// key go one at a time, so that both tiers end with the same, last, write. Past the bound
    /// the key's local entry is dropped and the write fails as `Error::Remote`, leaving nothing
    /// old in this process.
    async fn turn<'a>(&'a self, key: &'a K, until: Instant) -> Result<Turn<'a, K, V>, Error> {
        let lock = {
            let mut writes = lock(&self.writes);
            let (turn, writers) = writes.entry(key.clone()).or_default();
            *writers += 1;
            Arc::clone(turn)
        };
        let mut turn = Turn {
            inner: self,
            key,
            lock,
            held: None,
        };
        let left = until.saturating_duration_since(Instant::now());
        match deadline::bounded(left, Arc::clone(&turn.lock).lock_owned()).await {
            Ok(held) => {
                turn.held = Some(held);
                Ok(turn)
            }
            Err(elapsed) => {
                drop(turn);
                let _ = self.forget(key);
                Err(Error::Remote(RemoteError::Timeout(elapsed)))
            }
        }
    }

    /// `invalidate`: both tiers.
    async fn remove(&self, key: &K, rkey: &[u8]) -> Result<(), Error> {
        let until = Instant::now() + self.config.remote_timeout;
        let _turn = self.turn(key, until).await?;
        let landing = self.forget(key);
        Self::after_landing(landing, until).await;
        self.del_remote(rkey, self.config.remote_timeout).await
    }

    /// `set`: both tiers, in place of any load in progress.
    async fn store(&self, key: &K, value: Option<V>) -> Result<(), Error> {
        let rkey = self.redis_key(key)?;
        let now = Instant::now();
        let (fresh_until, stale_until) = self.expiry(value.is_none(), now);
        let bytes = self.envelope(key, value.as_ref(), fresh_until, Duration::ZERO, now)?;
        let until = now + self.config.remote_timeout;
        let _turn = self.turn(key, until).await?;
        let landing = self.forget(key);
        let heard = self.flushes();
        if let Some(local) = &self.local
            && self.heard_since(heard)
        {
            local.insert(
                key.clone(),
                value,
                fresh_until,
                stale_until,
                Instant::now(),
                None,
            );
            if !self.heard_since(heard) {
                local.remove(key);
            }
        }
        Self::after_landing(landing, until).await;
        self.put_remote(&rkey, &bytes, stale_until, None)
            .await
            .map(drop)
    }

    /// Drops the local entry and cuts off a load in progress from storing; returns that load if
    /// it is already writing Redis.
    fn forget(&self, key: &K) -> Option<Arc<Flight<V>>> {
        self.epoch(key).fetch_add(1, Ordering::AcqRel);
        self.written[self.stripe(key)].fetch_add(1, Ordering::AcqRel);
        let flight = self.flights().remove(key);
        if let Some(flight) = &flight {
            flight.superseded.store(true, Ordering::SeqCst);
        }
        if let Some(local) = &self.local {
            local.remove(key);
        }
        flight.filter(|flight| flight.writing.load(Ordering::SeqCst))
    }
}

impl<K, V> Heard for Inner<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn key_changed(&self, encoding: &[u8]) -> bool {
        let Some(key) = K::decode(encoding) else {
            return false;
        };
        let _ = self.forget(&key);
        true
    }

    fn flush(&self) {
        self.flush_local();
    }
}

/// A write's turn on its key; its drop lets the next write of the key go, and forgets the key's
/// turn once no write waits for it (so the map holds only keys being written).
struct Turn<'a, K: Hash + Eq, V> {
    inner: &'a Inner<K, V>,
    key: &'a K,
    lock: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq, V> Drop for Turn<'_, K, V> {
    fn drop(&mut self) {
        self.held = None;
        let mut writes = lock(&self.inner.writes);
        // Counted under the map's lock, so a drop mid-wait (its lock future still alive)
        // is counted out all the same.
        if let Some((_, writers)) = writes.get_mut(self.key) {
            *writers -= 1;
            if *writers == 0 {
                writes.remove(self.key);
            }
        }
    }
}

/// A mutex of ours, whether or not a panic (in a key's `Hash` or `Eq`) poisoned it: every map
/// is consistent between operations.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A load on its own task, and what happens when it ends, however it ends.
struct Landing<
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
> {
    inner: Arc<Inner<K, V>>,
    key: K,
    rkey: Vec<u8>,
    flight: Arc<Flight<V>>,
}

impl<K, V> Landing<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Takes this flight out of the map, unless a write already replaced it.
    fn leave(&self) {
        self.inner.leave(&self.key, &self.flight);
    }

    async fn run(self, load: impl Future<Output = Result<Option<V>, SharedError>> + Send) {
        let inner = &self.inner;
        let m = &inner.metrics;
        let token = match inner.lease(&self.rkey, self.flight.early).await {
            Leased::Held(token) => Some(token),
            Leased::Unfenced => None,
            Leased::Found(value, fresh_until, stale_until, early) => {
                // Another process loaded it: that value answers, and this load never runs.
                if !self.flight.superseded.load(Ordering::Acquire) {
                    let when = (fresh_until, stale_until, Instant::now());
                    inner.keep_local(&self.key, &value, when, early, &self.flight);
                }
                self.flight.finish(Ok(value));
                return;
            }
        };
        let started = Instant::now();
        let hard = inner.config.hard_timeout;
        let span = tracing::debug_span!("brisk_cache_load", cache = %inner.name);
        let load = deadline::bounded(hard, AssertUnwindSafe(load).catch_unwind()).instrument(span);
        let outcome = m.outcome(load.await, hard, |value| {
            if value.is_some() {
                &m.loaded
            } else {
                &m.load_none
            }
        });
        let took = started.elapsed();
        m.load_duration.record(took.as_secs_f64());
        let mut remote = None;
        if let Ok(value) = &outcome
            && !self.flight.superseded.load(Ordering::Acquire)
            && (value.is_some() || !inner.config.negative_ttl.is_some_and(|ttl| ttl.is_zero()))
        {
            let now = Instant::now();
            let (fresh_until, stale_until) = inner.expiry(value.is_none(), now);
            let early = Early::new(fresh_until, took, inner.config.early_beta);
            let when = (fresh_until, stale_until, now);
            inner.keep_local(&self.key, value, when, early, &self.flight);
            match inner.envelope(&self.key, value.as_ref(), fresh_until, took, now) {
                Ok(bytes) => remote = Some((bytes, stale_until)),
                Err(err) => {
                    tracing::warn!(cache = %inner.name, %err, "a loaded value was kept out of the remote tier");
                }
            }
        }
        if outcome.is_err() {
            self.leave(); // callers from now on load again rather than share this failure
        }
        self.flight.finish(outcome);
        // Callers arriving until the remote write is done still join this flight and get its
        // value, rather than miss in Redis and load again.
        let put = match remote {
            Some((bytes, stale_until))
                if {
                    self.flight.writing.store(true, Ordering::SeqCst);
                    inner.may_store(&self.key, &self.flight)
                } =>
            {
                Some(
                    inner
                        .put_remote(&self.rkey, &bytes, stale_until, token.as_deref())
                        .await,
                )
            }
            _ => None,
        };
        match put {
            Some(Ok(true)) => {}
            Some(Ok(false)) => {
                // An invalidation or a write, maybe from another process, came after this
                // load began: what it loaded may be older, and must not stay here either.
                m.lease_fenced.increment(1);
                if let Some(local) = &inner.local
                    && !self.flight.superseded.load(Ordering::Acquire)
                {
                    local.remove(&self.key);
                }
            }
            // A failed write was followed by a removal of the key and its lease.
            Some(Err(err)) => {
                tracing::debug!(cache = %inner.name, %err, "a loaded value could not be written to Redis");
            }
            // Nothing to store: let the next load in, rather than make it wait out the lease.
            None => {
                if let Some(token) = &token {
                    let _ = inner.remote.release(&self.rkey, token).await;
                }
            }
        }
    }
}

impl<K, V> Drop for Landing<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        self.leave();
        // Ended without an outcome: the task was dropped (its runtime shut down).
        self.flight.finish(Err(Error::Cancelled));
        self.flight.land();
    }
}

/// The batch load of `get_or_load_many` on its own task, and what happens when it ends: each
/// key's flight is answered, and what it loaded stored, however it ends.
struct BatchLanding<
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
> {
    inner: Arc<Inner<K, V>>,
    flights: Vec<BatchKey<K, V>>,
    /// The token of the batch's leases.
    token: String,
}

impl<K, V> BatchLanding<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Every key's load failed with `err`.
    fn fail(&self, err: &Error) {
        for (key, _, flight, _) in &self.flights {
            self.inner.leave(key, flight);
            flight.finish(Err(err.clone()));
        }
    }

    async fn run(self, load: BatchLoad<K, V>) {
        let inner = &self.inner;
        let m = &inner.metrics;
        let token = &self.token;
        let rkeys: Vec<Vec<u8>> = self
            .flights
            .iter()
            .map(|(_, rkey, ..)| rkey.clone())
            .collect();
        // The keys whose read found a stale or foreign value ask for their lease now (the read
        // leased only keys it found missing).
        let mut leasing: Vec<Leasing> = self.flights.iter().map(|(.., leasing)| *leasing).collect();
        let ask: Vec<usize> = (0..leasing.len())
            .filter(|&i| leasing[i] == Leasing::Ask)
            .collect();
        if !ask.is_empty() {
            let keys: Vec<Vec<u8>> = ask.iter().map(|&i| rkeys[i].clone()).collect();
            let taken = inner
                .remote
                .acquire_many(&keys, token, inner.lease_ttl())
                .await;
            for (n, &i) in ask.iter().enumerate() {
                leasing[i] = match &taken {
                    Ok(taken) if taken[n] => {
                        m.lease_acquired.increment(1);
                        Leasing::Mine
                    }
                    Ok(_) => {
                        m.lease_waited.increment(1);
                        Leasing::Others
                    }
                    Err(_) => Leasing::Unfenced,
                };
            }
        }
        // Whether key `i` is stored by this load (fenced by its lease, or unfenced).
        let stores = |i: usize| leasing[i] != Leasing::Others;
        let started = Instant::now();
        let hard = inner.config.hard_timeout;
        let span =
            tracing::debug_span!("brisk_cache_load_many", cache = %inner.name, keys = rkeys.len());
        let run = deadline::bounded(hard, AssertUnwindSafe(load).catch_unwind())
            .instrument(span)
            .await;
        let outcome = m.outcome(run, hard, |_| &m.loaded);
        let took = started.elapsed();
        m.load_duration.record(took.as_secs_f64());
        let mut values = match outcome {
            Ok(values) => values,
            Err(err) => {
                self.fail(&err);
                let held: Vec<Vec<u8>> = (0..rkeys.len())
                    .filter(|&i| leasing[i] == Leasing::Mine)
                    .map(|i| rkeys[i].clone())
                    .collect();
                inner.remote.release_many(&held, token).await;
                return;
            }
        };
        // Answer every key first, then store what may be stored in one round trip.
        // Per group (fenced by the batch's leases, or unfenced): the writes and their keys.
        let mut puts: [(Vec<_>, Vec<usize>); 2] =
            [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        let mut release = Vec::new();
        let mine = |i: usize| leasing[i] == Leasing::Mine;
        for (i, (key, rkey, flight, _)) in self.flights.iter().enumerate() {
            let value = values.remove(key);
            let keep =
                value.is_some() || !inner.config.negative_ttl.is_some_and(|ttl| ttl.is_zero());
            if keep && !flight.superseded.load(Ordering::Acquire) {
                let now = Instant::now();
                let (fresh_until, stale_until) = inner.expiry(value.is_none(), now);
                let early = Early::new(fresh_until, took, inner.config.early_beta);
                inner.keep_local(key, &value, (fresh_until, stale_until, now), early, flight);
                let bytes = inner.envelope(key, value.as_ref(), fresh_until, took, now);
                match bytes {
                    Ok(bytes) if bytes.len() <= inner.config.max_value_size && stores(i) => {
                        flight.writing.store(true, Ordering::SeqCst);
                        if !inner.may_store(key, flight) {
                            if mine(i) {
                                release.push(rkey.clone());
                            }
                        } else {
                            let ttl = stale_until.saturating_duration_since(Instant::now());
                            let group = &mut puts[usize::from(!mine(i))];
                            group.0.push((rkey.clone(), bytes, ttl));
                            group.1.push(i);
                        }
                    }
                    Ok(bytes) if bytes.len() > inner.config.max_value_size => {
                        m.oversize.increment(1);
                        if mine(i) {
                            release.push(rkey.clone());
                        }
                    }
                    Ok(_) => {} // another process holds the lease: it stores the key
                    Err(err) => {
                        tracing::warn!(cache = %inner.name, %err, "a loaded value was kept out of the remote tier");
                        if mine(i) {
                            release.push(rkey.clone());
                        }
                    }
                }
            } else if mine(i) {
                release.push(rkey.clone());
            }
            flight.finish(Ok(value));
        }
        for ((writes, at), token) in puts.iter().zip([Some(token.as_str()), None]) {
            if writes.is_empty() {
                continue;
            }
            match inner
                .remote
                .put_many(writes, token, inner.config.remote_timeout)
                .await
            {
                Ok(stored) => {
                    inner.publish(
                        writes
                            .iter()
                            .zip(&stored)
                            .filter(|(_, stored)| **stored)
                            .map(|((rkey, ..), _)| rkey.as_slice()),
                    );
                    for (&i, stored) in at.iter().zip(stored) {
                        let (key, _, flight, _) = &self.flights[i];
                        if !stored {
                            m.lease_fenced.increment(1);
                            if let Some(local) = &inner.local
                                && !flight.superseded.load(Ordering::Acquire)
                            {
                                local.remove(key);
                            }
                        }
                    }
                }
                Err(err) => {
                    // Some may have been written all the same.
                    inner.publish(writes.iter().map(|(rkey, ..)| rkey.as_slice()));
                    tracing::debug!(cache = %inner.name, %err, "loaded values could not be written to Redis");
                }
            }
        }
        inner.remote.release_many(&release, token).await;
    }
}

impl<K, V> Drop for BatchLanding<K, V>
where
    K: CacheKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        for (key, _, flight, _) in &self.flights {
            self.inner.leave(key, flight);
            // Ended without an outcome: the task was dropped (its runtime shut down).
            flight.finish(Err(Error::Cancelled));
            flight.land();
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("Cache")
            .field("name", &inner.name)
            .field("ttl", &inner.config.ttl)
            .field("local", &inner.local.as_ref().map(|local| local.ttl))
            .field("remote", &inner.remote)
            .field("codec", &inner.config.codec)
            .field("invalidation", &inner.listener.as_ref().map(|l| l.mode))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{Cache, lock};

    /// A write dropped while it waits for its turn leaves no entry behind: the map of keys being
    /// written holds only keys being written.
    #[tokio::test(start_paused = true)]
    async fn a_write_dropped_while_waiting_its_turn_leaves_nothing_behind() {
        let cache: Cache<u64, String> = Cache::builder("t").build().unwrap();
        let inner = &cache.inner;
        let far = Instant::now() + Duration::from_secs(60);
        let held = inner.turn(&1, far).await.unwrap();
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.set(&1, "v".into()).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(lock(&inner.writes).get(&1).map(|(_, n)| *n), Some(2));
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        drop(held);
        assert!(lock(&inner.writes).is_empty(), "nothing left for key 1");
        cache.set(&1, "w".into()).await.unwrap();
        assert!(lock(&inner.writes).is_empty());
        assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("w"));
    }
}
