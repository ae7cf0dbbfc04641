use std::fmt;
use std::sync::Arc;

use brisk_core::deadline::Elapsed;

/// Why a batched request — a [`Loader::load`](crate::Loader::load) or a call through the
/// [`layer`](crate::layer) — produced no value.
///
/// One error for both, since both fail the same ways. Cheap to clone: a batch's error is shared
/// by all its waiters as one `Arc<E>`.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum LoadError<E> {
    /// The batch function (or the layer's inner service) returned an error; every request of
    /// that batch gets the same one.
    #[error("batch failed: {0}")]
    Batch(#[source] Arc<E>),
    /// User code panicked: the batch function (before or after returning its future), the inner
    /// service, or a key's or value's `Hash`, `Eq` or `Clone` while the batch was handed out.
    #[error("user code panicked in a batch: {message}")]
    Panicked {
        /// The panic's message, if it had one.
        message: Arc<str>,
    },
    /// The key was not in the batch function's answer and the loader's policy is
    /// [`MissingKey::Error`](crate::MissingKey::Error). Loaders only.
    #[error("the batch function returned no value for this key")]
    NotFound,
    /// The inner service answered a batch of `expected` requests with `got` responses, so no
    /// response can be matched to its request. The layer only.
    #[error("the batched service answered {expected} requests with {got} responses")]
    WrongLength {
        /// Requests in the batch.
        expected: usize,
        /// Responses returned.
        got: usize,
    },
    /// The caller's deadline (from `brisk_core::deadline::scope`) passed while it waited. The
    /// batch itself goes on for its other waiters.
    #[error("gave up waiting for the batch: {0}")]
    Deadline(#[source] Elapsed),
    /// `max_queued_batches` batches were already waiting for a slot.
    #[error("too many batches queued (max_queued_batches); try again later")]
    Overloaded,
    /// No tokio runtime was running where the request was made; batches run on tokio tasks.
    #[error("no tokio runtime: batches run on tokio tasks, so load from inside a runtime")]
    NoRuntime,
    /// The loader has a `window` and the tokio runtime was built without timers
    /// (`enable_time`).
    #[error("the batch window needs tokio's timer: build the runtime with `enable_time()`")]
    NoTimer,
    /// The batch's task ended before it answered: its runtime shut down.
    #[error("the batch was cancelled before it answered (its runtime shut down)")]
    Cancelled,
}

impl<E> Clone for LoadError<E> {
    fn clone(&self) -> Self {
        match self {
            Self::Batch(err) => Self::Batch(Arc::clone(err)),
            Self::Panicked { message } => Self::Panicked {
                message: Arc::clone(message),
            },
            Self::NotFound => Self::NotFound,
            Self::WrongLength { expected, got } => Self::WrongLength {
                expected: *expected,
                got: *got,
            },
            Self::Deadline(elapsed) => Self::Deadline(*elapsed),
            Self::Overloaded => Self::Overloaded,
            Self::NoRuntime => Self::NoRuntime,
            Self::NoTimer => Self::NoTimer,
            Self::Cancelled => Self::Cancelled,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch(err) => f.debug_tuple("Batch").field(err).finish(),
            Self::Panicked { message } => f
                .debug_struct("Panicked")
                .field("message", message)
                .finish(),
            Self::NotFound => f.write_str("NotFound"),
            Self::WrongLength { expected, got } => f
                .debug_struct("WrongLength")
                .field("expected", expected)
                .field("got", got)
                .finish(),
            Self::Deadline(elapsed) => f.debug_tuple("Deadline").field(elapsed).finish(),
            Self::Overloaded => f.write_str("Overloaded"),
            Self::NoRuntime => f.write_str("NoRuntime"),
            Self::NoTimer => f.write_str("NoTimer"),
            Self::Cancelled => f.write_str("Cancelled"),
        }
    }
}

impl<E> LoadError<E> {
    /// The batch function's (or inner service's) error, if that is what failed.
    #[must_use]
    pub fn batch_error(&self) -> Option<&Arc<E>> {
        match self {
            Self::Batch(err) => Some(err),
            _ => None,
        }
    }

    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        Self::Panicked {
            message: message.into(),
        }
    }
}

/// A setting of a loader or a batch layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// `max_batch_size`.
    MaxBatchSize,
    /// `max_concurrent_batches`.
    MaxConcurrentBatches,
    /// `max_queued_batches`.
    MaxQueuedBatches,
    /// `window`.
    Window,
    /// `cache` (its capacity).
    CacheCapacity,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MaxBatchSize => "max_batch_size",
            Self::MaxConcurrentBatches => "max_concurrent_batches",
            Self::MaxQueuedBatches => "max_queued_batches",
            Self::Window => "window",
            Self::CacheCapacity => "cache capacity",
        })
    }
}

/// A builder was given a value it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A size, limit, capacity or window was zero.
    #[error("invalid batch configuration: {}", zero(*.0))]
    Zero(Setting),
}

fn zero(setting: Setting) -> String {
    match setting {
        Setting::Window => {
            "window must be positive; leave it unset to batch per scheduler turn".to_owned()
        }
        other => format!("{other} must be at least 1"),
    }
}
