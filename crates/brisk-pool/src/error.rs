use std::fmt;
use std::time::Duration;

use brisk_core::deadline::Elapsed;

/// Why a checkout gave no connection. Each message names what fired — the pool's wait timeout,
/// the request's deadline, the backend's error (with its causes' text: tokio-postgres's
/// "db error" says nothing until its source is read), the backoff, or `close`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError<E: std::error::Error + 'static> {
    /// The pool's wait timeout passed with no connection free; the diagnosis says why.
    #[error("the pool's wait timeout fired: {0}")]
    Exhausted(Box<Exhausted>),
    /// The caller's deadline passed first (its budget was shorter than the pool's wait timeout).
    #[error("{}", deadline_message(elapsed, diagnosis))]
    Deadline {
        /// Which bound fired.
        #[source]
        elapsed: Elapsed,
        /// The pool's state when the caller gave up.
        diagnosis: Box<Exhausted>,
    },
    /// Creating or recycling a connection failed.
    #[error("the pool could not open a connection: {}", chain(.0))]
    Backend(#[source] E),
    /// Opening connections failed just before, and the pool is backing off: this checkout
    /// failed at once, without trying, rather than add to a storm of connection attempts
    /// against a database that is down or recovering.
    #[error("{0}")]
    Unavailable(Box<Unavailable>),
    /// The pool was closed.
    #[error("the pool is closed")]
    Closed,
}

impl<E: std::error::Error + Send + Sync + 'static> PoolError<E> {
    /// The same error with the backend's error boxed: one type for every pool, what
    /// [`SourceError::Checkout`](crate::redis_source::SourceError) carries.
    #[must_use]
    pub fn erase(self) -> PoolError<BackendError> {
        match self {
            Self::Exhausted(diagnosis) => PoolError::Exhausted(diagnosis),
            Self::Deadline { elapsed, diagnosis } => PoolError::Deadline { elapsed, diagnosis },
            Self::Backend(err) => PoolError::Backend(BackendError(Box::new(err))),
            Self::Unavailable(why) => PoolError::Unavailable(why),
            Self::Closed => PoolError::Closed,
        }
    }
}

/// A backend's error, boxed: [`PoolError::erase`] makes one `PoolError` type of every pool's.
/// Its `Display` is the backend error's; `downcast_ref` reaches the original.
#[derive(Debug)]
pub struct BackendError(Box<dyn std::error::Error + Send + Sync>);

impl BackendError {
    /// The original error, if it is an `E`.
    #[must_use]
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// `error` and its sources' messages, joined by ": " (a source whose text the message already
/// holds is skipped): the whole story in one line, as logs and diagnoses need it.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let more = source.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = source.source();
    }
    text
}

fn deadline_message(elapsed: &Elapsed, diagnosis: &Exhausted) -> String {
    if elapsed.after().is_zero() {
        format!(
            "the request's deadline had passed before the checkout began (its budget was spent): {diagnosis}"
        )
    } else {
        format!(
            "the request's deadline fired: the checkout was allowed {:?}, less than the pool's \
             wait timeout: {diagnosis}",
            elapsed.after()
        )
    }
}

/// Why a checkout failed without trying to connect: the pool's connection attempts failed in a
/// row and it waits before the next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unavailable {
    /// The pool's name.
    pub pool: String,
    /// Connection attempts that failed in a row.
    pub failures: u32,
    /// How long until the next attempt is allowed.
    pub retry_in: Duration,
    /// The last error opening a connection.
    pub last_error: Option<String>,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pool `{}`: not connecting for another {:?} after {} failed connection attempt(s) in a row",
            self.pool, self.retry_in, self.failures
        )?;
        if let Some(error) = &self.last_error {
            write!(f, "; last connection error: {error}")?;
        }
        Ok(())
    }
}

/// The pool's state when a checkout gave up: enough to tell a pool that is too small from a
/// database that is down or a connection that is never returned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exhausted {
    /// The pool's name.
    pub pool: String,
    /// How long the caller waited.
    pub waited: Duration,
    /// Connections checked out.
    pub in_use: usize,
    /// The pool's maximum, when the backend says.
    pub max_size: Option<usize>,
    /// Callers waiting, this one included.
    pub waiting: usize,
    /// How long the longest-held connection has been checked out.
    pub oldest_checkout: Option<Duration>,
    /// The last error opening a connection, if any since the pool was wrapped.
    pub last_error: Option<String>,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pool `{}`: no connection after {:?}: {} in use",
            self.pool, self.waited, self.in_use
        )?;
        if let Some(max) = self.max_size {
            write!(f, " of {max}")?;
        }
        write!(f, ", {} waiting", self.waiting)?;
        if let Some(oldest) = self.oldest_checkout {
            write!(f, ", the oldest checked out {oldest:?} ago")?;
        }
        if let Some(error) = &self.last_error {
            write!(f, "; last connection error: {error}")?;
        }
        if self.max_size.is_some_and(|max| self.in_use < max) && !self.waited.is_zero() {
            // Room for another connection, yet none came: the wait went into opening one (or
            // checking an idle one), which did not finish.
            write!(
                f,
                "; the pool had room for another connection, so opening or checking one took \
                 the whole wait: is the database reachable but not answering?"
            )?;
        }
        Ok(())
    }
}

/// The longest any brisk-pool wait may be set to (a checkout's `wait_timeout`, `Multiplexed`'s
/// connect and response timeouts; `close` is bounded by it too): one hour. A longer one is
/// refused at build, not taken as "wait forever" — `Duration::MAX` would otherwise arm no
/// timer at all.
pub const MAX_WAIT: Duration = Duration::from_secs(3_600);

/// The longest a lifetime, interval or measuring window may be set to: a year, far beyond any
/// use, and far enough from overflowing an `Instant` (bb8 adds its reaper interval to one and
/// panics on overflow).
pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 86_400);

/// A builder was given a value it cannot work with: which setting, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A timeout or interval of zero: it would fail every operation, or spin.
    #[error("invalid pool configuration: {setting} must be positive")]
    Zero {
        /// The setting, as its builder method or field is named.
        setting: &'static str,
    },
    /// A timeout or period above its limit ([`MAX_WAIT`], [`MAX_PERIOD`]).
    #[error(
        "invalid pool configuration: {setting} of {value:?} is above its limit of {max:?} \
         (a wait that long is a wait forever)"
    )]
    TooLong {
        /// The setting.
        setting: &'static str,
        /// The value given.
        value: Duration,
        /// The largest accepted.
        max: Duration,
    },
    /// Another value the pool cannot work with.
    #[error("invalid pool configuration: {setting}: {why}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why it is refused.
        why: &'static str,
    },
}

impl BuildError {
    /// Checks a wait or period: positive and at most `max`.
    pub(crate) fn check(
        setting: &'static str,
        value: Duration,
        max: Duration,
    ) -> Result<(), BuildError> {
        if value.is_zero() {
            Err(Self::Zero { setting })
        } else if value > max {
            Err(Self::TooLong {
                setting,
                value,
                max,
            })
        } else {
            Ok(())
        }
    }

    pub(crate) fn invalid(setting: &'static str, why: &'static str) -> Self {
        Self::Invalid { setting, why }
    }
}

/// [`Instrumented::close`](crate::Instrumented::close) gave up waiting for checked-out
/// connections to come back; the pool is closed to new checkouts all the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pool `{pool}` closed with {in_use} connection(s) still checked out after {waited:?}")]
#[non_exhaustive]
pub struct CloseTimeout {
    /// The pool's name.
    pub pool: String,
    /// Connections still out, or still being checked out.
    pub in_use: usize,
    /// How long `close` waited.
    pub waited: Duration,
}
