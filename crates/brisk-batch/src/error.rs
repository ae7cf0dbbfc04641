use std::fmt;
use std::sync::Arc;

use brisk_core::deadline::Elapsed;

/// Why a load did not produce a value.
///
/// Cheap to clone: a batch's error is shared by all its waiters as one `Arc<E>`.
#[non_exhaustive]
pub enum LoadError<E> {
    /// The batch function returned an error; every key of that batch gets the same one.
    Batch(Arc<E>),
    /// The batch function panicked; the message, if it had one.
    Panicked(Arc<str>),
    /// The key was not in the batch function's answer and the loader's policy is
    /// [`MissingKey::Error`](crate::MissingKey::Error).
    NotFound,
    /// The caller's deadline (from `brisk_core::deadline::scope`) passed while waiting.
    Deadline(Elapsed),
    /// Too many batches were already waiting for a free slot (`max_queued_batches`).
    Overloaded,
}

impl<E> Clone for LoadError<E> {
    fn clone(&self) -> Self {
        match self {
            Self::Batch(err) => Self::Batch(Arc::clone(err)),
            Self::Panicked(msg) => Self::Panicked(Arc::clone(msg)),
            Self::NotFound => Self::NotFound,
            Self::Deadline(elapsed) => Self::Deadline(*elapsed),
            Self::Overloaded => Self::Overloaded,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch(err) => f.debug_tuple("Batch").field(err).finish(),
            Self::Panicked(msg) => f.debug_tuple("Panicked").field(msg).finish(),
            Self::NotFound => f.write_str("NotFound"),
            Self::Deadline(elapsed) => f.debug_tuple("Deadline").field(elapsed).finish(),
            Self::Overloaded => f.write_str("Overloaded"),
        }
    }
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch(err) => write!(f, "batch load failed: {err}"),
            Self::Panicked(msg) => write!(f, "batch function panicked: {msg}"),
            Self::NotFound => f.write_str("key not found by the batch function"),
            Self::Deadline(elapsed) => write!(f, "gave up waiting for the batch: {elapsed}"),
            Self::Overloaded => f.write_str("too many batches queued; try again later"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Batch(err) => Some(&**err),
            Self::Deadline(elapsed) => Some(elapsed),
            _ => None,
        }
    }
}

impl<E> LoadError<E> {
    /// The batch function's error, if that is what failed.
    #[must_use]
    pub fn batch_error(&self) -> Option<&Arc<E>> {
        match self {
            Self::Batch(err) => Some(err),
            _ => None,
        }
    }
}

/// A builder was given a value it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid batch configuration: {0}")]
pub struct BuildError(pub(crate) &'static str);
