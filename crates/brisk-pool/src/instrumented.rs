//! A pool wrapper that bounds every wait, measures every checkout and explains every timeout.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use brisk_core::deadline;
use brisk_metrics::catalog::{
    POOL_CONNECTIONS, POOL_ERRORS, POOL_MAX, POOL_NESTED, POOL_PENDING, POOL_RECOMMENDED,
    POOL_TIMEOUTS, POOL_USE_TIME, POOL_WAIT_TIME,
};
use brisk_metrics::{Counter, Gauge, Histogram};
use metrics::Label;

use crate::backoff::{Backoff, HEALTHY};
use crate::clock::{self, Instant};
use crate::holders::{Holders, NO_AGE, NO_TASK, Released, task_tag};
use crate::stripes::{self, Stripes};
use crate::{
    BuildError, CloseTimeout, Creations, Exhausted, GetError, IdleSince, Lifecycle, MAX_PERIOD,
    MAX_WAIT, Pool, PoolError, Unavailable,
};

/// Wraps a [`Pool`]: every checkout waits at most `min(wait_timeout, deadline::remaining())`,
/// is measured under the OpenTelemetry `db.client.connection.*` metrics, and a checkout that
/// times out says why ([`Exhausted`]).
///
/// Cloning is cheap; clones share the pool and its bookkeeping.
pub struct Instrumented<P: Pool> {
    shared: Arc<Shared<P>>,
}

impl<P: Pool> Clone for Instrumented<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P: Pool> fmt::Debug for Instrumented<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instrumented")
            .field("name", &self.shared.name)
            .field("wait_timeout", &self.shared.wait_timeout)
            .finish_non_exhaustive()
    }
}

/// What runs on a connection about to be discarded.
type OnDiscard<C> = Box<dyn Fn(&mut C) + Send + Sync>;

// Aligned so that its fields start past the `Arc`'s reference counts, which every checkout
// writes (the `Checkout`'s handle on the pool): the fields every checkout reads (`closed`, the
// backoff, the refresh time) then stay in cache instead of following those counts between cores.
#[repr(align(128))]
struct Shared<P: Pool> {
    pool: P,
    creations: Option<Creations>,
    on_discard: Option<OnDiscard<P::Connection>>,
    name: String,
    wait_timeout: Duration,
    metrics: Metrics,
    /// Checkouts out that hold no slot in `holders` (those waiting, or finding every slot
    /// taken), callers waiting and the demand, counted per thread.
    counters: Stripes,
    /// Checkouts of `warm_up` in flight: the backend counts them as waiting callers.
    warming: AtomicUsize,
    /// Each checkout out or starting: since when (to name the oldest in a diagnosis) and by
    /// which task (to notice a task asking for a second one); its slot also counts it as out.
    holders: Holders,
    last_error: Mutex<Option<String>>,
    /// For `reap`: since when each idle connection has been idle.
    idle_since: Mutex<IdleSince>,
    /// When the window of the demand behind the recommended size began (ms since `created`);
    /// the demand itself is in `counters`.
    window_start_ms: AtomicU64,
    recommend_every: Duration,
    /// Shared with a `Measured` manager given through `creations`, which reports every attempt.
    backoff: Arc<Backoff>,
    /// Set by `close`: new checkouts fail at once.
    closed: AtomicBool,
    /// Notified when the last checked-out connection comes back, for `close`.
    drained: tokio::sync::Notify,
    /// Whether the task refreshing the gauges without checkouts runs.
    refresher: AtomicBool,
    /// When the idle and max gauges were last read from the pool, in ns since `created`.
    refreshed_ns: AtomicU64,
    created: Instant,
}

/// How often `close` counts the checkouts out again when no return woke it.
const RECOUNT_EVERY: Duration = Duration::from_millis(10);

/// How often the gauges are refreshed when no checkout does it.
const QUIET_REFRESH: Duration = Duration::from_secs(1);

/// The idle and max gauges come from the backend's status, which takes its lock: read it at
/// most this often instead of on every checkout.
const REFRESH_EVERY_MS: u64 = 100;

struct Metrics {
    nested: Counter,
    recommended: Gauge,
    wait: Histogram,
    use_time: Histogram,
    timeouts: Counter,
    backend_errors: Counter,
    closed: Counter,
    unavailable: Counter,
    idle: Gauge,
    used: Gauge,
    max: Gauge,
    pending: Gauge,
}

impl Metrics {
    fn new(pool: &str) -> Self {
        let name = || {
            vec![Label::new(
                "db_client_connection_pool_name",
                pool.to_owned(),
            )]
        };
        let with = |key: &'static str, value: &'static str| {
            let mut labels = name();
            labels.push(Label::new(key, value));
            labels
        };
        Self {
            nested: POOL_NESTED.counter(name()),
            recommended: POOL_RECOMMENDED.gauge(name()),
            wait: POOL_WAIT_TIME.histogram(name()),
            use_time: POOL_USE_TIME.histogram(name()),
            timeouts: POOL_TIMEOUTS.counter(name()),
            backend_errors: POOL_ERRORS.counter(with("reason", "backend")),
            closed: POOL_ERRORS.counter(with("reason", "closed")),
            unavailable: POOL_ERRORS.counter(with("reason", "unavailable")),
            idle: POOL_CONNECTIONS.gauge(with("db_client_connection_state", "idle")),
            used: POOL_CONNECTIONS.gauge(with("db_client_connection_state", "used")),
            max: POOL_MAX.gauge(name()),
            pending: POOL_PENDING.gauge(name()),
        }
    }
}

/// Settings for [`Instrumented`].
#[must_use]
pub struct InstrumentedBuilder<P: Pool> {
    pool: P,
    creations: Option<Creations>,
    on_discard: Option<OnDiscard<P::Connection>>,
    name: String,
    wait_timeout: Duration,
    recommend_every: Duration,
    backoff: (Duration, Duration),
}

impl<P: Pool> fmt::Debug for InstrumentedBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentedBuilder")
            .field("name", &self.name)
            .field("wait_timeout", &self.wait_timeout)
            .field("recommend_every", &self.recommend_every)
            .field("connect_backoff", &self.backoff)
            .field("on_discard", &self.on_discard.is_some())
            .finish_non_exhaustive()
    }
}

impl<P: Pool> InstrumentedBuilder<P> {
    /// The `db_client_connection_pool_name` label and the name in diagnoses. Default `"default"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The longest a checkout waits (the caller's deadline can shorten it). Default 5 s; at
    /// most [`MAX_WAIT`](crate::MAX_WAIT) (one hour): there is no "wait forever".
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// What a [`Measured`](crate::Measured) manager saw of the connections it opened: its last
    /// error then appears in exhaustion diagnoses (bb8 does not report it otherwise).
    pub fn creations(mut self, creations: Creations) -> Self {
        self.creations = Some(creations);
        self
    }

    /// How long checkouts fail fast after a connection attempt failed: `first` after one
    /// failure, doubling with each failure in a row up to `max`, each pause shortened by a
    /// random share of up to half. Meanwhile a checkout that would have to open a connection
    /// fails at once with [`PoolError::Unavailable`] (naming the last connection error); idle
    /// connections still serve, and once the pause is over one checkout tries again. Default
    /// 50 ms up to 2 s.
    ///
    /// Without it a database that is down is hammered: over deadpool every checkout opens a
    /// connection of its own, and one service made 176,000 attempts in 5 s. The checkout that
    /// tries again after a pause and gets nothing in its time counts as one more failure. bb8
    /// retries in the background with its own backoff: with its manager in
    /// [`Measured`](crate::Measured) and its [`creations`](Self::creations) given here, those
    /// attempts drive this backoff too, and checkouts fail fast instead of each waiting out its
    /// bound.
    pub fn connect_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max);
        self
    }

    /// Runs `hook` on each connection about to be discarded ([`Checkout::discard`], or a
    /// checkout cut off mid-use), before it is closed: the place to cancel the work the server
    /// may still be running for it. Closing a connection does not stop a query in flight;
    /// PostgreSQL, for one, notices only when it next writes to the socket.
    ///
    /// ```no_run
    /// # fn run(pool: deadpool_postgres::Pool) -> Result<(), brisk_pool::BuildError> {
    /// use brisk_pool::Instrumented;
    ///
    /// let pool = Instrumented::builder(pool)
    ///     .on_discard(|client: &mut deadpool_postgres::Object| {
    ///         // Ask the server to cancel the query still running on this connection.
    ///         let token = client.cancel_token();
    ///         if let Ok(runtime) = tokio::runtime::Handle::try_current() {
    ///             runtime.spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });
    ///         }
    ///     })
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_discard(mut self, hook: impl Fn(&mut P::Connection) + Send + Sync + 'static) -> Self {
        self.on_discard = Some(Box::new(hook));
        self
    }

    /// How much history the recommended-size gauge averages over. Default 60 s.
    pub fn recommend_every(mut self, window: Duration) -> Self {
        self.recommend_every = window;
        self
    }

    /// Checks the settings and wraps the pool.
    ///
    /// # Errors
    /// [`BuildError`] for a wait timeout of zero or above [`MAX_WAIT`](crate::MAX_WAIT), a
    /// `recommend_every` below 100 ms or above [`MAX_PERIOD`](crate::MAX_PERIOD), backoff
    /// pauses of zero, above `MAX_WAIT` or with the first above the longest, an empty name, or
    /// a pool whose maximum size is zero (it could never hand out a connection).
    pub fn build(self) -> Result<Instrumented<P>, BuildError> {
        BuildError::check("wait_timeout", self.wait_timeout, MAX_WAIT)?;
        if self.name.is_empty() {
            return Err(BuildError::invalid("name", "must not be empty"));
        }
        if self.pool.status().max_size == Some(0) {
            return Err(BuildError::invalid(
                "max size",
                "the pool's max size is 0: it could never hand out a connection",
            ));
        }
        BuildError::check("recommend_every", self.recommend_every, MAX_PERIOD)?;
        let (first, max) = self.backoff;
        BuildError::check("connect_backoff first", first, MAX_WAIT)?;
        BuildError::check("connect_backoff max", max, MAX_WAIT)?;
        if first > max {
            return Err(BuildError::invalid(
                "connect_backoff",
                "the first pause must not exceed the longest",
            ));
        }
        if self.recommend_every < Duration::from_millis(REFRESH_EVERY_MS) {
            return Err(BuildError::invalid(
                "recommend_every",
                "must be at least 100 ms",
            ));
        }
        let holders = Holders::new(self.pool.status().max_size);
        let created = clock::now();
        let shared = Shared {
            metrics: Metrics::new(&self.name),
            pool: self.pool,
            creations: self.creations,
            on_discard: self.on_discard,
            name: self.name,
            wait_timeout: self.wait_timeout,
            counters: Stripes::new(),
            warming: AtomicUsize::new(0),
            holders,
            last_error: Mutex::default(),
            idle_since: Mutex::default(),
            refreshed_ns: AtomicU64::new(0),
            refresher: AtomicBool::new(false),
            created,
            window_start_ms: AtomicU64::new(0),
            recommend_every: self.recommend_every,
            backoff: Arc::new(Backoff::new(first, max, created)),
            closed: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
        };
        let instrumented = Instrumented {
            shared: Arc::new(shared),
        };
        if let Some(creations) = &instrumented.shared.creations {
            creations.report_to(&instrumented.shared.backoff);
        }
        instrumented.refresh_sizes();
        // No recommendation before the first window closes: until then the gauge reads the
        // pool's size, "no change", rather than 0, which reads as "shrink the pool".
        let status = instrumented.shared.pool.status();
        #[allow(clippy::cast_precision_loss)] // a pool's size fits an f64 exactly
        let size = status.max_size.unwrap_or(status.size).max(1) as f64;
        instrumented.shared.metrics.recommended.set(size);
        instrumented.start_refresher();
        Ok(instrumented)
    }
}

impl<P: Pool> Instrumented<P> {
    /// Starts wrapping `pool`.
    pub fn builder(pool: P) -> InstrumentedBuilder<P> {
        InstrumentedBuilder {
            pool,
            creations: None,
            on_discard: None,
            name: "default".to_owned(),
            wait_timeout: Duration::from_secs(5),
            recommend_every: Duration::from_secs(60),
            backoff: (Duration::from_millis(50), Duration::from_secs(2)),
        }
    }

    /// The wrapped pool.
    pub fn get_ref(&self) -> &P {
        &self.shared.pool
    }

    /// How full the pool is; `waiting` counts this wrapper's callers when the backend does not.
    pub fn status(&self) -> crate::Status {
        let mut status = self.shared.pool.status();
        let warming = self.shared.warming.load(Ordering::Acquire);
        match status.waiting {
            // deadpool counts its users (checkouts out and callers waiting) and reports
            // `size - users` idle, or `users - size` waiting. A warm-up's checkouts in flight
            // are users too, but hold no connection (it returns each as it gets it) and are no
            // callers: left in, an idle connection beside a warm-up stuck connecting read as in
            // use, or a caller as two.
            Some(waiting) if warming > 0 => {
                let users =
                    (status.size - status.idle.min(status.size) + waiting).saturating_sub(warming);
                status.idle = status.size.saturating_sub(users);
                status.waiting = Some(users.saturating_sub(status.size));
            }
            Some(_) => {}
            None => status.waiting = Some(self.shared.counters.waiting()),
        }
        status
    }

    /// Checks out a connection, waiting at most `min(wait_timeout, deadline::remaining())`.
    ///
    /// # Errors
    /// [`PoolError::Exhausted`] (or [`PoolError::Deadline`]) with the pool's state when time ran
    /// out; [`PoolError::Backend`] when opening a connection failed; [`PoolError::Closed`].
    pub async fn get(&self) -> Result<Checkout<P>, PoolError<P::Error>> {
        let shared = &self.shared;
        let task = tokio::task::try_id().map(task_tag);
        self.notice_nested(task);
        // Counted as out from here, before `closed` is read: `close` stores `closed` and then
        // counts the checkouts out (all SeqCst), so either this checkout sees the pool closed,
        // or `close` waits for it — a checkout still connecting is not forgotten. The guard
        // uncounts it if it fails or is dropped.
        let mut entered = Entered::new(shared, task.unwrap_or(NO_TASK));
        if shared.closed.load(Ordering::SeqCst) {
            shared.metrics.closed.increment(1);
            return Err(PoolError::Closed);
        }
        if !shared.refresher.load(Ordering::Relaxed) {
            self.start_refresher();
        }
        let backing_off = shared.backoff.until_ns.load(Ordering::Relaxed);
        let mut probe = false;
        if backing_off != HEALTHY {
            match self.held_back(backing_off) {
                Ok(claimed) => probe = claimed,
                Err(unavailable) => {
                    shared.metrics.unavailable.increment(1);
                    return Err(PoolError::Unavailable(Box::new(unavailable)));
                }
            }
        }
        // Pinned where it is made: moved into `bounded`, the backend's future (hundreds of bytes)
        // was copied on every checkout.
        let backend = std::pin::pin!(shared.pool.get());
        let mut wait = std::pin::pin!(deadline::bounded(shared.wait_timeout, backend));
        // Most checkouts find a connection at once: then nobody waits, and no clock is read and
        // no waiter counted for it. One that has to wait starts its clock and its waiter count
        // after that first poll, and is not polled again until woken: polled again at once, it
        // re-registered with the backend's queue (deadpool's semaphore, under its lock) for
        // every wait, which with many tasks waiting made that lock the pool's busiest.
        let mut waiting = None;
        let result = std::future::poll_fn(|cx| {
            let polled = wait.as_mut().poll(cx);
            if polled.is_pending() && waiting.is_none() {
                // Its slot is for a connection's holder meanwhile.
                entered.unslot();
                waiting = Some((clock::now(), Waiting::new(shared)));
            }
            polled
        })
        .await;
        let (waited, now) = match waiting {
            None => (Duration::ZERO, clock::now()),
            Some((started, waiting)) => {
                let waited = clock::now().duration_since(started);
                drop(waiting);
                shared.add_demand(waited);
                (waited, started + waited)
            }
        };
        match result {
            Ok(Ok(connection)) => {
                if shared.closed.load(Ordering::SeqCst) {
                    // Closed while this checkout was connecting or waiting: `close` waited for
                    // it, and it must not hand out a connection now.
                    drop(connection);
                    shared.metrics.closed.increment(1);
                    return Err(PoolError::Closed);
                }
                if backing_off != HEALTHY {
                    shared.backoff.succeeded();
                }
                // Without a recorder, one look tells so for the checkout's metrics, and its
                // return records (or skips) the same: the used gauge stays balanced.
                let measured = shared.metrics.wait.is_enabled();
                if measured {
                    shared.metrics.wait.record(waited.as_secs_f64());
                    shared.metrics.used.increment(1.0);
                    // Registered now, with the recorder in place (a test's local one), so that
                    // the return records there wherever it happens.
                    let _ = shared.metrics.use_time.is_enabled();
                }
                let since = now;
                let since_ns = shared.nanos_at(since);
                let slot = entered.connected(since_ns);
                self.maybe_refresh_sizes(since_ns);
                Ok(Checkout {
                    connection: Some(connection),
                    cut_off: false,
                    measured,
                    slot,
                    since,
                    owner: self.clone(),
                })
            }
            Ok(Err(GetError::Backend(err))) => {
                shared.metrics.backend_errors.increment(1);
                *lock(&shared.last_error) = Some(crate::error::chain(&err));
                // A measured manager reports each attempt itself.
                if shared.creations.is_none() {
                    shared.backoff.failed(now);
                }
                Err(PoolError::Backend(err))
            }
            Ok(Err(GetError::Closed)) => {
                shared.metrics.closed.increment(1);
                Err(PoolError::Closed)
            }
            Ok(Err(GetError::Timeout)) => {
                shared.metrics.timeouts.increment(1);
                if probe {
                    shared.backoff.failed(now);
                }
                Err(PoolError::Exhausted(Box::new(self.diagnose(waited))))
            }
            Err(elapsed) => {
                shared.metrics.timeouts.increment(1);
                // The checkout that was to try connecting again got nothing in its time: a
                // connection that hangs, or a backend (bb8) still failing in the background.
                if probe {
                    shared.backoff.failed(now);
                }
                let diagnosis = Box::new(self.diagnose(waited));
                if elapsed.is_deadline() {
                    Err(PoolError::Deadline { elapsed, diagnosis })
                } else {
                    Err(PoolError::Exhausted(diagnosis))
                }
            }
        }
    }

    /// Opens connections now until `connections` are idle, or as many as the pool's size
    /// allows, so the first requests do not pay for them. Returns how many are idle afterwards.
    ///
    /// It works beside requests rather than as one: the connections it opens are not
    /// checkouts (no wait, use-time or recommended-size measurement, no nested-checkout count),
    /// it opens only what is missing and never waits for a connection in use, and it does
    /// nothing while callers wait for a connection (they need it more) or while the pool backs
    /// off after a failed connection; its own failures start that backoff.
    ///
    /// A pool hands out idle connections first, so to make it open new ones the warm-up asks
    /// for the idle ones too, all at once, and gives back each connection as soon as it has it:
    /// it holds an idle one only while the backend checks it (deadpool's recycle, bb8's
    /// `test_on_check_out`), never while waiting for its own connects, so a connect that hangs
    /// starves no caller. Its checkouts in flight count neither as connections in use
    /// nor as waiting callers in [`status`](Self::status).
    ///
    /// # Errors
    /// The first error opening a connection (or its wait bound passing); those opened before
    /// it stay in the pool.
    pub async fn warm_up(&self, connections: usize) -> Result<usize, PoolError<P::Error>> {
        let shared = &self.shared;
        let status = self.status();
        let room = status
            .max_size
            .map_or(usize::MAX, |max| max.saturating_sub(status.size));
        let missing = connections.saturating_sub(status.idle).min(room);
        if missing == 0 || status.waiting.unwrap_or(0) > 0 || shared.closed.load(Ordering::Acquire)
        {
            return Ok(status.idle);
        }
        // Not while the pool backs off after a failed connection: the top-up would try every
        // round and hammer a database that is down.
        let started = clock::now();
        let backing_off = shared.backoff.until_ns.load(Ordering::Relaxed);
        if backing_off != HEALTHY && shared.nanos_at(started) < backing_off {
            return Ok(status.idle);
        }
        let opens: Vec<_> = (0..missing)
            .map_while(|_| shared.pool.open_idle())
            .map(|open| deadline::bounded(shared.wait_timeout, open))
            .collect();
        if !opens.is_empty() {
            let mut first_error = None;
            for opened in futures_util::future::join_all(opens).await {
                self.warmed(opened, backing_off, started, &mut first_error);
            }
            self.refresh_sizes();
            return match first_error {
                Some(err) => Err(err),
                None => Ok(self.status().idle),
            };
        }
        // The pool hands out idle connections first: to make it open `missing` new ones, ask
        // for the idle ones too, all in one round, so the others find none and connect. Then
        // give the idle ones back at once, before any connect is awaited: held across a
        // connect that hangs, they would starve the callers who need them.
        let open_one = || {
            let warming = Warming::new(&shared.warming);
            Box::pin(async move {
                let got = deadline::bounded(shared.wait_timeout, shared.pool.get()).await;
                drop(warming);
                got
            })
        };
        let mut connecting = futures_util::stream::FuturesUnordered::new();
        let mut at_once = Vec::with_capacity(status.idle);
        for _ in 0..status.idle + missing {
            let mut get = open_one();
            match std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await {
                Poll::Ready(got) => at_once.push(got),
                Poll::Pending => connecting.push(get),
            }
        }
        let mut first_error = None;
        for got in at_once {
            self.warmed(got, backing_off, started, &mut first_error);
        }
        while let Some(got) = futures_util::StreamExt::next(&mut connecting).await {
            self.warmed(got, backing_off, started, &mut first_error);
        }
        self.refresh_sizes();
        match first_error {
            Some(err) => Err(err),
            None => Ok(self.status().idle),
        }
    }

    /// Takes one result of `warm_up` (a connection, which goes back to the pool at once, or a
    /// connection opened into the pool); the first error is kept in `first_error`.
    fn warmed<T>(
        &self,
        got: Result<Result<T, GetError<P::Error>>, deadline::Elapsed>,
        backing_off: u64,
        started: Instant,
        first_error: &mut Option<PoolError<P::Error>>,
    ) {
        let shared = &self.shared;
        let err = match got {
            Ok(Ok(connection)) => {
                drop(connection);
                if backing_off != HEALTHY {
                    shared.backoff.succeeded();
                }
                return;
            }
            Ok(Err(GetError::Backend(err))) => {
                *lock(&shared.last_error) = Some(crate::error::chain(&err));
                // A measured manager reports each attempt itself.
                if shared.creations.is_none() {
                    shared.backoff.failed(clock::now());
                }
                PoolError::Backend(err)
            }
            Ok(Err(GetError::Closed)) => PoolError::Closed,
            Ok(Err(GetError::Timeout)) | Err(_) => PoolError::Exhausted(Box::new(
                self.diagnose(clock::now().duration_since(started)),
            )),
        };
        first_error.get_or_insert(err);
    }

    /// Closes the pool: new checkouts fail with [`PoolError::Closed`] at once, and so do those
    /// waiting for a connection (over deadpool, whose pool is closed at once; over bb8 they
    /// wait out their bound); then waits up to `timeout` (at most
    /// [`MAX_WAIT`](crate::MAX_WAIT), one hour, whatever is asked) for the connections checked
    /// out, and the checkouts still connecting, to come back. Connections out keep working
    /// meanwhile and are closed as they return.
    ///
    /// # Errors
    /// [`CloseTimeout`] with the connections still out when the timeout passed; the pool is
    /// closed to new checkouts either way.
    pub async fn close(&self, timeout: Duration) -> Result<(), CloseTimeout> {
        let shared = &self.shared;
        // SeqCst here and in `Checkout::drop`: either the last return sees `closed` and
        // notifies, or this sees `in_use` at zero.
        shared.closed.store(true, Ordering::SeqCst);
        // At once, not after draining: callers waiting for a connection then fail with
        // `Closed` (over deadpool) instead of holding `close` up until their wait timeout;
        // connections out keep working and are closed as they come back.
        shared.pool.close();
        let started = clock::now();
        let drained = async {
            loop {
                // Register before checking, so a return in between is not missed.
                let notified = shared.drained.notified();
                if shared.in_use() == 0 {
                    return;
                }
                // A return frees its slot with a plain store, which its own read of `closed`
                // may overtake: then it does not notify, and this counts again a little later.
                let _ = tokio::time::timeout(RECOUNT_EVERY, notified).await;
            }
        };
        let result = tokio::time::timeout(timeout.min(MAX_WAIT), drained).await;
        self.refresh_sizes();
        result.map_err(|_| CloseTimeout {
            pool: shared.name.clone(),
            in_use: shared.in_use(),
            waited: clock::now().duration_since(started),
        })
    }

    /// Closes the idle connections `lifecycle` no longer keeps (over deadpool; bb8 reaps by
    /// itself) and returns how many.
    pub fn reap(&self, lifecycle: &Lifecycle) -> usize {
        let reaped = self
            .shared
            .pool
            .reap(lifecycle, &mut lock(&self.shared.idle_since))
            .unwrap_or(0);
        self.refresh_sizes();
        reaped
    }

    /// Applies `lifecycle` on a spawned tokio task, at once and then every `reap_every`: reaps,
    /// then tops the pool up to `min_idle` idle connections — so a pool is warm from its start.
    /// The task ends when the pool is closed or dropped.
    ///
    /// # Errors
    /// [`BuildError`] if `lifecycle` is invalid, or asks for more idle connections than the
    /// pool's maximum size.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_lifecycle(
        &self,
        lifecycle: Lifecycle,
    ) -> Result<tokio::task::JoinHandle<()>, BuildError> {
        lifecycle.validate()?;
        if self
            .status()
            .max_size
            .is_some_and(|max| lifecycle.min_idle > max)
        {
            return Err(BuildError::invalid(
                "min_idle",
                "must not exceed the pool's max size",
            ));
        }
        let shared = Arc::downgrade(&self.shared);
        Ok(tokio::spawn(async move {
            loop {
                {
                    // Held only for this round: dropping the pool ends the task.
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    if shared.closed.load(Ordering::Acquire) {
                        return;
                    }
                    let pool = Instrumented { shared };
                    pool.reap(&lifecycle);
                    // A failure here shows in the diagnoses' last connection error (and, with
                    // `Measured`, in its metrics); the next round tries again.
                    let _ = pool.warm_up(lifecycle.min_idle).await;
                }
                tokio::time::sleep(lifecycle.reap_every).await;
            }
        }))
    }

    /// Whether a checkout made while backing off (until `until_ns`) goes through — `Ok(true)`
    /// when it is the one to try connecting again — or must fail fast, and why. Idle
    /// connections still serve. Once the pause is over, the first checkout to claim the
    /// attempt (pushing the pause on for the others until it reports) goes through; if it gets
    /// no connection in its time, that counts as one more failure.
    #[cold]
    fn held_back(&self, until_ns: u64) -> Result<bool, Unavailable> {
        let shared = &self.shared;
        let now_ns = shared.nanos_at(clock::now());
        let backoff = &shared.backoff;
        let claimed = now_ns >= until_ns && {
            let next = backoff.until(backoff.failures.load(Ordering::Relaxed), now_ns);
            backoff
                .until_ns
                .compare_exchange(until_ns, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        };
        if claimed {
            return Ok(true);
        }
        if shared.pool.status().idle > 0 {
            return Ok(false);
        }
        let until = backoff.until_ns.load(Ordering::Relaxed);
        Err(Unavailable {
            pool: shared.name.clone(),
            failures: backoff.failures.load(Ordering::Relaxed),
            retry_in: Duration::from_nanos(until.saturating_sub(now_ns)),
            last_error: self.last_error(),
        })
    }

    /// The last error opening a connection: a measured manager sees every attempt, bb8's
    /// background ones included.
    fn last_error(&self) -> Option<String> {
        let shared = &self.shared;
        shared
            .creations
            .as_ref()
            .and_then(Creations::last_error)
            .or_else(|| lock(&shared.last_error).clone())
    }

    /// A task holding a connection that waits for another can deadlock the pool: when every
    /// connection is held by such a task, none is ever returned. A checkout made by a task that
    /// holds a connection marks that connection's slot; the count is confirmed when the task
    /// returns that connection ([`Self::confirm_nested`]).
    fn notice_nested(&self, task: Option<u64>) {
        let Some(task) = task else { return };
        self.shared.holders.mark_nested(task);
    }

    /// A connection comes back whose task made `nested` checkouts while holding it: counted,
    /// and logged in debug builds, if it comes back from that same task. A checkout can move to
    /// another task unseen (a move is a copy of bytes): one returned by another task may have
    /// moved before those checkouts, and is given the benefit of the doubt.
    #[cold]
    fn confirm_nested(&self, (tag, nested): (u64, u64)) {
        if tokio::task::try_id().map(task_tag) != Some(tag) {
            return;
        }
        self.shared.metrics.nested.increment(nested);
        #[cfg(debug_assertions)]
        tracing::warn!(
            pool = %self.shared.name,
            nested,
            "a task that held a connection asked the same pool for another; \
             enough such tasks at once deadlock the pool"
        );
    }

    fn diagnose(&self, waited: Duration) -> Exhausted {
        let shared = &self.shared;
        let status = self.status();
        self.refresh_sizes();
        let now_ns = shared.nanos_at(clock::now());
        let oldest = shared
            .holders
            .oldest_ns()
            .map(|since| Duration::from_nanos(now_ns.saturating_sub(since)));
        Exhausted {
            pool: shared.name.clone(),
            waited,
            in_use: status.in_use(),
            max_size: status.max_size,
            waiting: status.waiting.unwrap_or(0).max(1),
            oldest_checkout: oldest,
            last_error: self.last_error(),
        }
    }

    /// Starts, once and on a tokio runtime (at build, or the first checkout), the task that
    /// refreshes the gauges every [`QUIET_REFRESH`]: checkouts and returns refresh them at most
    /// every 100 ms, so without one the last change before a quiet spell went unseen (4 open,
    /// 0 in use showed 3 idle for minutes), and the recommended size never closed its window.
    /// It ends once the pool is dropped.
    #[cold]
    fn start_refresher(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.shared.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::downgrade(&self.shared);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(QUIET_REFRESH).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let pool = Instrumented { shared };
                let now_ns = pool.shared.nanos_at(clock::now());
                pool.shared.refreshed_ns.store(now_ns, Ordering::Relaxed);
                pool.refresh_sizes();
                pool.maybe_recommend(now_ns / 1_000_000);
            }
        });
    }

    /// Reads the idle and max gauges from the pool's status.
    fn refresh_sizes(&self) {
        let status = self.shared.pool.status();
        let metrics = &self.shared.metrics;
        metrics.idle.set(status.idle as f64);
        if let Some(max) = status.max_size {
            metrics.max.set(max as f64);
        }
    }

    /// [`Self::refresh_sizes`], at most every [`REFRESH_EVERY_MS`].
    fn maybe_refresh_sizes(&self, now_ns: u64) {
        let shared = &self.shared;
        let last = shared.refreshed_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) >= REFRESH_EVERY_MS * 1_000_000
            && shared
                .refreshed_ns
                .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refresh_sizes();
            self.maybe_recommend(now_ns / 1_000_000);
        }
    }

    /// Little's law: the average number of callers holding or waiting for a connection is the
    /// time they spent doing so divided by the window. Recommends 1.5 times that, so bursts
    /// above the average still find a connection.
    fn maybe_recommend(&self, now_ms: u64) {
        let shared = &self.shared;
        let start = shared.window_start_ms.load(Ordering::Relaxed);
        let window_ms = now_ms.saturating_sub(start);
        let every_ms = u64::try_from(shared.recommend_every.as_millis()).unwrap_or(u64::MAX);
        if window_ms < every_ms
            || shared
                .window_start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let demand_ns = shared.counters.take_demand();
        #[allow(clippy::cast_precision_loss)] // nanoseconds of a window fit f64 closely enough
        let average = demand_ns as f64 / (window_ms as f64 * 1e6);
        shared
            .metrics
            .recommended
            .set((average * 1.5).ceil().max(1.0));
    }
}

impl<P: Pool> Shared<P> {
    /// `at` as nanoseconds since the pool was wrapped.
    fn nanos_at(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.created).as_nanos()).unwrap_or(u64::MAX)
    }

    fn add_demand(&self, time: Duration) {
        let ns = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        self.counters.add_demand(ns);
    }
}

impl<P: Pool> Shared<P> {
    /// Checkouts out or in progress: those holding a slot and those counted in the stripes.
    fn in_use(&self) -> usize {
        self.holders.claimed() + self.counters.in_use()
    }

    /// One checkout less out (or in progress), counted in slot `slot` or else in the stripes;
    /// once the pool is closed, wakes `close` to count again.
    fn release(&self, slot: Option<usize>) -> Option<Released> {
        let released = match slot {
            Some(at) => Some(self.holders.release(at)),
            None => {
                self.counters.leave();
                None
            }
        };
        // Every return after `close` notifies: which one is the last is not known here, and
        // `close` counts again.
        if self.closed.load(Ordering::SeqCst) {
            self.drained.notify_waiters();
        }
        released
    }
}

/// A checkout in progress, counted as out until it becomes a [`Checkout`] or fails or is
/// dropped (then uncounted): in a holder slot if one is free (the claim is the only
/// read-modify-write of a checkout that needs no wait), else in the stripes.
struct Entered<'a, P: Pool> {
    shared: &'a Shared<P>,
    task: u64,
    slot: Option<usize>,
}

impl<'a, P: Pool> Entered<'a, P> {
    fn new(shared: &'a Shared<P>, task: u64) -> Self {
        let slot = shared.holders.claim(task, NO_AGE, stripes::index());
        if slot.is_none() {
            shared.counters.enter();
        }
        Self { shared, task, slot }
    }

    /// Moves the count from the slot to the stripes: a checkout that waits should not keep a
    /// slot from the holder of a connection. Counted in both for an instant, never in neither.
    fn unslot(&mut self) {
        if let Some(at) = self.slot.take() {
            self.shared.counters.enter();
            self.shared.holders.release(at);
        }
    }

    /// The checkout got its connection at `since_ns`: from now on the [`Checkout`] is counted,
    /// in the slot returned (claimed now if it had none and one is free) or in the stripes.
    fn connected(self, since_ns: u64) -> Option<usize> {
        let shared = self.shared;
        let slot = self.slot.or_else(|| {
            let claimed = shared.holders.claim(self.task, since_ns, stripes::index());
            if claimed.is_some() {
                shared.counters.leave();
            }
            claimed
        });
        if let Some(at) = slot {
            shared.holders.start(at, since_ns);
        }
        std::mem::forget(self);
        slot
    }
}

impl<P: Pool> Drop for Entered<'_, P> {
    fn drop(&mut self) {
        self.shared.release(self.slot);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a caller as waiting until its checkout ends, even if it is dropped meanwhile. The
/// pending gauge is moved at both ends or at neither, by whether a recorder was there when the
/// wait began: one installed meanwhile must not see a decrement without its increment (-1).
struct Waiting<'a, P: Pool> {
    shared: &'a Shared<P>,
    measured: bool,
}

impl<'a, P: Pool> Waiting<'a, P> {
    fn new(shared: &'a Shared<P>) -> Self {
        shared.counters.begin_wait();
        let measured = shared.metrics.wait.is_enabled();
        if measured {
            shared.metrics.pending.increment(1.0);
        }
        Self { shared, measured }
    }
}

impl<P: Pool> Drop for Waiting<'_, P> {
    fn drop(&mut self) {
        self.shared.counters.end_wait();
        if self.measured {
            self.shared.metrics.pending.decrement(1.0);
        }
    }
}

/// A checked-out connection: derefs to the backend's connection and goes back to the pool when
/// dropped, recording how long it was used.
///
/// # A connection whose operation was cut off is not handed out again
///
/// When a request's deadline drops a query half-way, the server may still be running it: a
/// connection returned then would make the next callers queue behind that query. So a
/// checkout is closed (taken out of the pool, [`Pool::discard`]) rather than returned when it
/// is dropped
/// - after the request's deadline has passed (`deadline::remaining()` is zero: the usual way an
///   operation is cut off; a request that overran its deadline yet finished its queries loses
///   a connection it could have kept, a reconnection's worth),
/// - while a panic unwinds, or
/// - with a Redis command or pipeline run through it (its [`ConnectionLike`] implementation,
///   with the `redis` feature) that never finished.
///
/// A checkout dropped for another reason (a client disconnect cancelling the handler, a
/// `select!` that lost) cannot be told from one returned after its work: when you cut an
/// operation yourself, call [`Checkout::discard`].
///
/// [`ConnectionLike`]: ::redis::aio::ConnectionLike
pub struct Checkout<P: Pool> {
    connection: Option<P::Connection>,
    /// Set while an operation runs through this checkout, and by `discard`: closed, not
    /// returned, on drop.
    pub(crate) cut_off: bool,
    /// Whether a recorder was there at checkout: the return is measured too.
    measured: bool,
    /// Where this checkout is recorded in [`Holders`], unless it went untracked.
    slot: Option<usize>,
    since: Instant,
    owner: Instrumented<P>,
}

impl<P: Pool> Deref for Checkout<P> {
    type Target = P::Connection;

    fn deref(&self) -> &P::Connection {
        self.connection.as_ref().expect("present until drop")
    }
}

impl<P: Pool> DerefMut for Checkout<P> {
    fn deref_mut(&mut self) -> &mut P::Connection {
        self.connection.as_mut().expect("present until drop")
    }
}

impl<P: Pool> fmt::Debug for Checkout<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("pool", &self.owner.shared.name)
            .field("held", &clock::now().duration_since(self.since))
            .finish_non_exhaustive()
    }
}

impl<P: Pool> Checkout<P> {
    /// Closes the connection instead of returning it to the pool: for one whose operation you
    /// cut off, or left in a state the next caller must not inherit (an open transaction, a
    /// session setting). The pool opens a new one when needed.
    ///
    /// Over bb8 this needs the manager wrapped in [`Measured`](crate::Measured); over another
    /// bb8 manager the connection goes back to the pool.
    pub fn discard(mut self) {
        self.cut_off = true;
    }
}

impl<P: Pool> Drop for Checkout<P> {
    fn drop(&mut self) {
        let shared = &self.owner.shared;
        // Uncounted before the connection goes back: freed after, a checkout on another
        // thread could take the connection and find every slot still taken.
        if let Some(nested) = shared.release(self.slot).and_then(Released::nested) {
            self.owner.confirm_nested(nested);
        }
        // Return (or close) the connection before the gauges below are read.
        if let Some(connection) = self.connection.take() {
            let cut_off = self.cut_off
                || std::thread::panicking()
                || deadline::remaining().is_some_and(|left| left.is_zero());
            if cut_off {
                let mut connection = connection;
                if let Some(hook) = &shared.on_discard {
                    hook(&mut connection);
                }
                shared.pool.discard(connection);
            } else if shared.closed.load(Ordering::SeqCst) {
                // Returned after `close`: closed, not kept idle (bb8 would keep it open).
                shared.pool.discard(connection);
            } else {
                drop(connection);
            }
        }
        // What follows only feeds metrics (the demand: the recommended size): without a
        // recorder, not even the clock is read.
        if self.measured {
            shared.metrics.used.decrement(1.0);
            let now = clock::now();
            let held = now.duration_since(self.since);
            shared.metrics.use_time.record(held.as_secs_f64());
            shared.add_demand(held);
            self.owner.maybe_refresh_sizes(shared.nanos_at(now));
        }
    }
}

/// Counts one checkout of `warm_up` as in flight while it lives.
struct Warming<'a>(&'a AtomicUsize);

impl<'a> Warming<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Warming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{OnceLock, Weak};

    use super::*;
    use crate::Status;

    type Probe = Arc<OnceLock<Weak<Shared<OnePool>>>>;

    /// A pool of one connection that, as the connection goes back, checks whether a checkout
    /// made at that instant (on another thread, say) would find a holder slot free.
    struct OnePool {
        probe: Probe,
        slot_was_free: Arc<AtomicBool>,
    }

    struct Connection {
        probe: Probe,
        slot_was_free: Arc<AtomicBool>,
    }

    impl Drop for Connection {
        fn drop(&mut self) {
            let shared = self.probe.get().and_then(Weak::upgrade).unwrap();
            let claimed: Vec<usize> = std::iter::from_fn(|| shared.holders.claim(99, 0, 0))
                .take(shared.holders.len())
                .collect();
            self.slot_was_free
                .store(claimed.len() == shared.holders.len(), Ordering::SeqCst);
            for at in claimed {
                shared.holders.release(at);
            }
        }
    }

    impl Pool for OnePool {
        type Connection = Connection;
        type Error = std::io::Error;

        async fn get(&self) -> Result<Connection, GetError<std::io::Error>> {
            Ok(Connection {
                probe: Arc::clone(&self.probe),
                slot_was_free: Arc::clone(&self.slot_was_free),
            })
        }

        fn status(&self) -> Status {
            Status {
                size: 1,
                idle: 0,
                max_size: Some(1),
                waiting: None,
            }
        }
    }

    #[test]
    fn a_returned_connection_finds_its_holder_slot_already_free() {
        let probe = Probe::default();
        let slot_was_free = Arc::new(AtomicBool::new(false));
        let pool = Instrumented::builder(OnePool {
            probe: Arc::clone(&probe),
            slot_was_free: Arc::clone(&slot_was_free),
        })
        .build()
        .unwrap();
        probe.set(Arc::downgrade(&pool.shared)).ok().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        drop(runtime.block_on(pool.get()).unwrap());
        assert!(
            slot_was_free.load(Ordering::SeqCst),
            "a checkout taking the connection as it came back would have gone untracked"
        );
    }

    /// A pool whose checkout waits until `open` is set, counting how often it is polled.
    #[derive(Default)]
    struct Gated {
        open: Arc<AtomicBool>,
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<std::task::Waker>>>,
    }

    impl Pool for Gated {
        type Connection = ();
        type Error = std::io::Error;

        async fn get(&self) -> Result<(), GetError<std::io::Error>> {
            std::future::poll_fn(|cx| {
                self.polls.fetch_add(1, Ordering::SeqCst);
                if self.open.load(Ordering::SeqCst) {
                    return Poll::Ready(Ok(()));
                }
                *lock(&self.waker) = Some(cx.waker().clone());
                Poll::Pending
            })
            .await
        }

        fn status(&self) -> Status {
            Status {
                size: 1,
                idle: 0,
                max_size: Some(1),
                waiting: None,
            }
        }
    }

    /// A checkout that has to wait is polled again only when woken: polled twice in a row, it
    /// re-registered with deadpool's semaphore (under its lock) on every wait.
    #[tokio::test]
    async fn a_waiting_checkout_polls_the_backend_once_per_wake() {
        let gated = Gated::default();
        let (open, polls, waker) = (
            Arc::clone(&gated.open),
            Arc::clone(&gated.polls),
            Arc::clone(&gated.waker),
        );
        let pool = Instrumented::builder(gated).build().unwrap();
        let checkout = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, then waits");
        assert_eq!(pool.status().waiting, Some(1), "counted as waiting");
        open.store(true, Ordering::SeqCst);
        lock(&waker).take().unwrap().wake();
        checkout.await.unwrap().unwrap();
        assert_eq!(polls.load(Ordering::SeqCst), 2, "and once more when woken");
        assert_eq!(pool.status().waiting, Some(0));
    }

    /// More checkouts out than the pool has holder slots (a backend handing out more than its
    /// size says): those past the slots are counted in the stripes, and `close` waits for all.
    #[tokio::test(start_paused = true)]
    async fn close_waits_for_checkouts_past_the_holder_slots() {
        let gated = Gated::default();
        gated.open.store(true, Ordering::SeqCst);
        let pool = Instrumented::builder(gated).build().unwrap();
        let past = pool.shared.holders.len() + 4;
        let out: Vec<_> = futures_util::future::try_join_all((0..past).map(|_| pool.get()))
            .await
            .unwrap();
        let err = pool.close(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.in_use, past);
        drop(out);
        pool.close(Duration::from_millis(50)).await.unwrap();
    }

    /// A checkout still waiting for the backend gives its holder slot up, and stays counted:
    /// `close` waits for it, and it gets no connection once the pool is closed.
    #[tokio::test(start_paused = true)]
    async fn close_waits_for_a_checkout_still_waiting() {
        let gated = Gated::default();
        let (open, waker) = (Arc::clone(&gated.open), Arc::clone(&gated.waker));
        let pool = Instrumented::builder(gated).build().unwrap();
        let checkout = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.shared.holders.claimed(), 0, "its slot given up");
        let err = pool.close(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.in_use, 1);
        open.store(true, Ordering::SeqCst);
        lock(&waker).take().unwrap().wake();
        assert!(matches!(checkout.await.unwrap(), Err(PoolError::Closed)));
        pool.close(Duration::from_millis(50)).await.unwrap();
    }

    /// A checkout made with no recorder and returned once one is installed records nothing on
    /// return either: the used gauge stays balanced instead of reading -1.
    #[tokio::test]
    async fn a_checkout_measured_at_neither_end_when_no_recorder_saw_it_leave() {
        use brisk_metrics::testing::Capture;
        let gated = Gated::default();
        gated.open.store(true, Ordering::SeqCst);
        let pool = Instrumented::builder(gated).name("late").build().unwrap();
        let checkout = pool.get().await.unwrap();
        let capture = Capture::new();
        capture.run(|| drop(checkout));
        let used = [
            ("db_client_connection_pool_name", "late"),
            ("db_client_connection_state", "used"),
        ];
        assert_eq!(capture.gauge(POOL_CONNECTIONS.name, &used), None);
        assert!(capture.histogram(POOL_USE_TIME.name, &used[..1]).is_empty());
        let checkout = capture.run(|| futures_util::FutureExt::now_or_never(pool.get()));
        capture.run(|| drop(checkout));
        assert_eq!(capture.gauge(POOL_CONNECTIONS.name, &used), Some(0.0));
        assert_eq!(capture.histogram(POOL_USE_TIME.name, &used[..1]).len(), 1);
    }
}
