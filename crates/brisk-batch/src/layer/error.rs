use std::fmt;
use std::sync::Arc;

use brisk_core::deadline::Elapsed;

/// Why a request through [`Batch`](super::Batch) got no response.
///
/// Cheap to clone: the inner service's error is shared by the whole batch as one `Arc<E>`.
#[non_exhaustive]
pub enum BatchError<E> {
    /// The inner service failed the batch (in `poll_ready` or `call`).
    Service(Arc<E>),
    /// The inner service answered a batch of `expected` requests with `got` responses, so no
    /// response can be matched to its request.
    WrongLength {
        /// Requests in the batch.
        expected: usize,
        /// Responses returned.
        got: usize,
    },
    /// The inner service panicked; the message, if it had one.
    Panicked(Arc<str>),
    /// The caller's deadline passed while waiting.
    Deadline(Elapsed),
    /// Too many batches were already waiting for a free slot.
    Overloaded,
}

impl<E> Clone for BatchError<E> {
    fn clone(&self) -> Self {
        match self {
            Self::Service(err) => Self::Service(Arc::clone(err)),
            Self::WrongLength { expected, got } => Self::WrongLength {
                expected: *expected,
                got: *got,
            },
            Self::Panicked(msg) => Self::Panicked(Arc::clone(msg)),
            Self::Deadline(elapsed) => Self::Deadline(*elapsed),
            Self::Overloaded => Self::Overloaded,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for BatchError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(err) => f.debug_tuple("Service").field(err).finish(),
            Self::WrongLength { expected, got } => f
                .debug_struct("WrongLength")
                .field("expected", expected)
                .field("got", got)
                .finish(),
            Self::Panicked(msg) => f.debug_tuple("Panicked").field(msg).finish(),
            Self::Deadline(elapsed) => f.debug_tuple("Deadline").field(elapsed).finish(),
            Self::Overloaded => f.write_str("Overloaded"),
        }
    }
}

impl<E: fmt::Display> fmt::Display for BatchError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(err) => write!(f, "batched service failed: {err}"),
            Self::WrongLength { expected, got } => write!(
                f,
                "batched service answered {expected} requests with {got} responses"
            ),
            Self::Panicked(msg) => write!(f, "batched service panicked: {msg}"),
            Self::Deadline(elapsed) => write!(f, "gave up waiting for the batch: {elapsed}"),
            Self::Overloaded => f.write_str("too many batches queued; try again later"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BatchError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Service(err) => Some(&**err),
            Self::Deadline(elapsed) => Some(elapsed),
            _ => None,
        }
    }
}
