//! A manager wrapper that measures every connection the pool opens.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use brisk_metrics::catalog::{POOL_CONNECT_ATTEMPTS, POOL_CREATE_ERRORS, POOL_CREATE_TIME};
use brisk_metrics::{Counter, Histogram};
use metrics::Label;

/// Wraps a deadpool `Manager` or a bb8 `ManageConnection`: every attempt to open a connection
/// is counted (`brisk_pool_connect_attempts_total`) and timed
/// (`db_client_connection_create_time_seconds`), every failure counted
/// (`brisk_pool_create_errors_total`) and remembered, so that [`Instrumented`](crate::Instrumented)
/// can name the last one in its diagnosis even over bb8, which does not report it. Over bb8 it
/// is also what lets [`Checkout::discard`](crate::Checkout::discard) close a connection.
///
/// ```no_run
/// # async fn run(manager: bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>) -> Result<(), Box<dyn std::error::Error>> {
/// use brisk_pool::{Instrumented, Measured};
///
/// let manager = Measured::new(manager, "main");
/// let creations = manager.creations();
/// let pool = bb8::Pool::builder().build(manager).await?;
/// let pool = Instrumented::builder(pool).name("main").creations(creations).build()?;
/// # Ok(())
/// # }
/// ```
pub struct Measured<M> {
    inner: M,
    creations: Creations,
}

impl<M> fmt::Debug for Measured<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measured").finish_non_exhaustive()
    }
}

thread_local! {
    /// Set while [`Pool::discard`](crate::Pool::discard) drops a bb8 connection: bb8 asks its
    /// manager's `has_broken` as the connection goes back, on this thread, and a `Measured`
    /// manager answers yes, so bb8 closes it instead of keeping it.
    static DISCARDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `drop_connection` with connections marked as being discarded.
#[cfg_attr(not(feature = "bb8"), allow(dead_code))]
pub(crate) fn discarding(drop_connection: impl FnOnce()) {
    DISCARDING.with(|flag| flag.set(true));
    drop_connection();
    DISCARDING.with(|flag| flag.set(false));
}

/// What a [`Measured`] manager saw of the connections it opened; cheap to clone.
#[derive(Clone)]
pub struct Creations(Arc<Inner>);

// Without a backend feature nothing measures; the handle still serves `Instrumented`.
#[cfg_attr(not(any(feature = "deadpool", feature = "bb8")), allow(dead_code))]
struct Inner {
    /// The backoff of the `Instrumented` pool these creations were given to, if any.
    backoff: std::sync::OnceLock<std::sync::Weak<crate::backoff::Backoff>>,
    attempts: Counter,
    time: Histogram,
    errors: Counter,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for Creations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creations")
            .field("last_error", &self.last_error())
            .finish()
    }
}

impl Creations {
    /// Makes every attempt this manager sees count in `backoff` (the first pool given these
    /// creations keeps them).
    pub(crate) fn report_to(&self, backoff: &Arc<crate::backoff::Backoff>) {
        let _ = self.0.backoff.set(Arc::downgrade(backoff));
    }

    /// The last error opening a connection, if any.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.0
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(any(feature = "deadpool", feature = "bb8"))]
    async fn measure<T, E: std::error::Error + 'static>(
        &self,
        open: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.0.attempts.increment(1);
        let started = std::time::Instant::now();
        let result = open.await;
        self.0.time.record(started.elapsed().as_secs_f64());
        if let Some(backoff) = self.0.backoff.get().and_then(std::sync::Weak::upgrade) {
            match &result {
                Err(_) => backoff.failed(crate::clock::now()),
                Ok(_)
                    if backoff.until_ns.load(std::sync::atomic::Ordering::Relaxed)
                        != crate::backoff::HEALTHY =>
                {
                    backoff.succeeded();
                }
                Ok(_) => {}
            }
        }
        if let Err(err) = &result {
            self.0.errors.increment(1);
            *self
                .0
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(crate::error::chain(err));
        }
        result
    }
}

impl<M> Measured<M> {
    /// Wraps `manager`; `pool` is the `db_client_connection_pool_name` label.
    pub fn new(manager: M, pool: &str) -> Self {
        let label = || {
            vec![Label::new(
                "db_client_connection_pool_name",
                pool.to_owned(),
            )]
        };
        Self {
            inner: manager,
            creations: Creations(Arc::new(Inner {
                backoff: std::sync::OnceLock::new(),
                attempts: POOL_CONNECT_ATTEMPTS.counter(label()),
                time: POOL_CREATE_TIME.histogram(label()),
                errors: POOL_CREATE_ERRORS.counter(label()),
                last_error: Mutex::default(),
            })),
        }
    }

    /// A handle on what this manager sees, for [`InstrumentedBuilder::creations`](crate::InstrumentedBuilder::creations).
    #[must_use]
    pub fn creations(&self) -> Creations {
        self.creations.clone()
    }

    /// The wrapped manager.
    pub fn get_ref(&self) -> &M {
        &self.inner
    }
}

#[cfg(feature = "deadpool")]
impl<M> deadpool::managed::Manager for Measured<M>
where
    M: deadpool::managed::Manager,
    M::Error: std::error::Error + 'static,
{
    type Type = M::Type;
    type Error = M::Error;

    async fn create(&self) -> Result<M::Type, M::Error> {
        self.creations.measure(self.inner.create()).await
    }

    async fn recycle(
        &self,
        connection: &mut M::Type,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<M::Error> {
        self.inner.recycle(connection, metrics).await
    }

    fn detach(&self, connection: &mut M::Type) {
        self.inner.detach(connection);
    }
}

#[cfg(feature = "bb8")]
impl<M> bb8::ManageConnection for Measured<M>
where
    M: bb8::ManageConnection,
    M::Error: std::error::Error + 'static,
{
    type Connection = M::Connection;
    type Error = M::Error;

    async fn connect(&self) -> Result<M::Connection, M::Error> {
        self.creations.measure(self.inner.connect()).await
    }

    async fn is_valid(&self, connection: &mut M::Connection) -> Result<(), M::Error> {
        self.inner.is_valid(connection).await
    }

    fn has_broken(&self, connection: &mut M::Connection) -> bool {
        DISCARDING.with(std::cell::Cell::get) || self.inner.has_broken(connection)
    }
}
