//! What can go wrong, for a caller and at build time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use brisk_core::deadline::Elapsed;

use crate::key::KeyError;

/// A loader's or writer's own error, shared by every caller that waited on it.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A cache operation failed. Cheap to clone: every caller waiting on one load gets the same error.
///
/// Only loads and writes fail a read: a remote tier that is down, slow or full of bad bytes makes
/// a read slower (it goes to the loader), never an error. [`Error::Remote`] comes only from the
/// operations that exist to change the remote tier: [`set`](crate::Cache::set),
/// [`invalidate`](crate::Cache::invalidate) and [`write_through`](crate::Cache::write_through).
///
/// [`source()`](std::error::Error::source) of [`Error::Load`] and [`Error::Write`] is your own
/// error itself, so `err.source().and_then(|e| e.downcast_ref::<MyError>())` finds it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// The loader returned an error and no stale value was there to serve instead.
    Load(SharedError),
    /// The loader panicked; the key can be loaded again.
    Panicked {
        /// The panic's message.
        message: Arc<str>,
    },
    /// The loader ran past the cache's hard timeout and was dropped.
    LoadTimeout {
        /// The hard timeout.
        after: Duration,
    },
    /// The request's deadline (`brisk::deadline::scope`) passed before a value was ready; the
    /// load goes on for the callers still waiting, and fills the cache.
    Deadline(Elapsed),
    /// The key cannot be stored.
    Key(KeyError),
    /// The source of truth refused the write in `write_through`; the cache was not touched.
    Write(SharedError),
    /// The remote tier could not be changed (`set`, `invalidate`, the cache update of
    /// `write_through`); what it holds for the key may be outdated until its TTL ends.
    Remote(RemoteError),
    /// The value could not be serialized; nothing was stored.
    Encode(Arc<str>),
    /// A tag was refused (empty, above 256 bytes, more than 32 for one entry), or the tag
    /// function panicked; nothing was stored.
    Tag(Arc<str>),
    /// The load's task was dropped before it finished: its runtime shut down.
    Cancelled,
    /// Called outside a tokio runtime, which loads run on.
    NoRuntime,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Load(err) => write!(f, "the loader failed: {err}"),
            Self::Panicked { message } => write!(f, "the loader panicked: {message}"),
            Self::LoadTimeout { after } => {
                write!(
                    f,
                    "the loader did not finish within the cache's hard timeout of {after:?}"
                )
            }
            Self::Deadline(elapsed) => {
                write!(f, "no value before the request's deadline: {elapsed}")
            }
            Self::Key(err) => write!(f, "the key was refused: {err}"),
            Self::Write(err) => {
                write!(
                    f,
                    "the write to the source of truth failed; the cache was not changed: {err}"
                )
            }
            Self::Remote(err) => write!(
                f,
                "the remote tier could not be updated, it may serve an old value until the TTL ends: {err}"
            ),
            Self::Encode(message) => write!(f, "the value could not be serialized: {message}"),
            Self::Tag(message) => write!(f, "the tags were refused: {message}"),
            Self::Cancelled => {
                f.write_str("the load was cancelled: the runtime it ran on shut down")
            }
            Self::NoRuntime => f.write_str(
                "brisk-cache needs a tokio runtime with timers (tokio's `rt` and `time` features)",
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Load(err) | Self::Write(err) => Some(&**err),
            Self::Deadline(elapsed) => Some(elapsed),
            Self::Key(err) => Some(err),
            Self::Remote(err) => Some(err),
            _ => None,
        }
    }
}

impl From<KeyError> for Error {
    fn from(err: KeyError) -> Self {
        Self::Key(err)
    }
}

/// Why the remote tier did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// It did not answer within the remote timeout, or the request's deadline.
    #[error("no answer from the remote tier: {0}")]
    Timeout(Elapsed),
    /// The circuit breaker is open after failures in a row: Redis is not called for a while.
    #[error("the remote tier's circuit breaker is open after repeated failures")]
    BreakerOpen,
    /// No connection from the source.
    #[error("no connection to Redis: {0}")]
    Source(#[source] Arc<brisk_pool::redis_source::SourceError>),
    /// Redis answered with an error, or the connection broke.
    #[error("Redis failed: {0}")]
    Redis(#[source] Arc<redis::RedisError>),
    /// Redis answered, but not as a command of this shape must (a reply of the wrong length).
    #[error("Redis answered unexpectedly: {0}")]
    Reply(String),
}

/// A setting `build()` refused. Nothing is clamped: each setting is taken as given or refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The name is empty, longer than 64 characters, or has a character outside
    /// `A-Z a-z 0-9 _ - .`.
    #[error(
        "the cache name {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' or '.' (it names Redis keys and metric series)"
    )]
    Name(String),
    /// A duration that must be above zero is zero.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// A duration above what the cache accepts (Redis TTLs are milliseconds; timers near
    /// `Duration::MAX` overflow).
    #[error("{setting} of {value:?} is above the most the cache accepts, {max:?}")]
    TooLong {
        /// The setting.
        setting: &'static str,
        /// What was given.
        value: Duration,
        /// The most accepted.
        max: Duration,
    },
    /// The TTL jitter is outside `[0, 1)`.
    #[error("ttl_jitter must be in [0, 1), a fraction of the TTL taken off at random; got {0}")]
    Jitter(String),
    /// The early refresh's beta is not a number above zero and at most 100.
    #[error("early_refresh beta must be above 0 and at most 100 (1 is XFetch's usual); got {0}")]
    EarlyRefresh(String),
    /// The soft timeout is not below the hard timeout.
    #[error("the soft timeout ({soft:?}) must be below the hard timeout ({hard:?})")]
    SoftAboveHard {
        /// The soft timeout.
        soft: Duration,
        /// The hard timeout.
        hard: Duration,
    },
    /// The invalidation setting cannot be honoured: no Redis, tracking over a cluster, or no
    /// Tokio runtime to run its connection on.
    #[error("invalidation {0}")]
    Invalidation(&'static str),
    /// One TTL is above the TTL it must not exceed.
    #[error("{setting} ({value:?}) must not exceed the cache's ttl ({ttl:?})")]
    AboveTtl {
        /// The local tier's or the negative TTL.
        setting: &'static str,
        /// What was given.
        value: Duration,
        /// The cache's TTL.
        ttl: Duration,
    },
}
