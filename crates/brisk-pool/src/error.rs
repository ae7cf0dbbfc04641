use std::fmt;
use std::time::Duration;

use brisk_core::deadline::Elapsed;

/// Why a checkout gave no connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError<E: std::error::Error + 'static> {
    /// No connection came free in time; the diagnosis says why.
    #[error("{0}")]
    Exhausted(Box<Exhausted>),
    /// The caller's deadline passed first (its budget was shorter than the pool's wait timeout).
    #[error("{diagnosis}")]
    Deadline {
        /// Which bound fired.
        #[source]
        elapsed: Elapsed,
        /// The pool's state when the caller gave up.
        diagnosis: Box<Exhausted>,
    },
    /// Creating or recycling a connection failed.
    #[error("the pool could not open a connection")]
    Backend(#[source] E),
    /// The pool was closed.
    #[error("the pool is closed")]
    Closed,
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
        Ok(())
    }
}

/// A builder was given a value it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool configuration: {0}")]
pub struct BuildError(pub(crate) &'static str);

/// [`Instrumented::close`](crate::Instrumented::close) gave up waiting for checked-out
/// connections to come back; the pool is closed to new checkouts all the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pool `{pool}` closed with {in_use} connection(s) still checked out after {waited:?}")]
#[non_exhaustive]
pub struct CloseTimeout {
    /// The pool's name.
    pub pool: String,
    /// Connections still out.
    pub in_use: usize,
    /// How long `close` waited.
    pub waited: Duration,
}
