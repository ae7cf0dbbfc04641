//! How a refusal leaves a layer: as the service's error, or as an HTTP response.

use crate::ratelimit::{Decision, RateLimiter};
use crate::{BoxError, Refusal};

/// What a layer makes of a [`Refusal`], and of the inner service's own errors.
///
/// Two implementations: [`Errors`] (the default: tower's convention, the refusal is the
/// service's error, boxed) and, with the `http` feature, [`HttpResponses`](crate::HttpResponses) (the refusal is a
/// response and the service keeps its error type, which for axum is `Infallible`).
pub trait Respond<Response, E>: Clone + Send + Sync + 'static {
    /// The error type of the wrapped service.
    type Error;

    /// The refusal as the service's output.
    ///
    /// # Errors
    /// With [`Errors`], always: the boxed refusal.
    fn refuse(&self, refusal: Refusal) -> Result<Response, Self::Error>;

    /// The inner service's error as the wrapped service's error.
    fn error(&self, error: E) -> Self::Error;

    /// Whether [`admitted`](Self::admitted) adds anything (default: no).
    fn annotates(&self) -> bool {
        false
    }

    /// Adds what an admitted response should say about its rate limit (the `RateLimit`
    /// headers); nothing by default.
    fn admitted(&self, response: &mut Response, limiter: &RateLimiter, decision: &Decision) {
        let _ = (response, limiter, decision);
    }
}

/// The refusal a future holds, made into its output: once, when the future completes.
pub(crate) fn refuse_once<T, E, R: Respond<T, E>>(
    respond: &R,
    refusal: &mut Option<Refusal>,
) -> Result<T, R::Error> {
    respond.refuse(
        refusal
            .take()
            .expect("a response future is not polled after it completed"),
    )
}

/// Refusals as errors: the service's error becomes [`BoxError`], holding a [`Refusal`] or the
/// inner service's error.
///
/// ```
/// # use brisk_guard::{BoxError, Refusal};
/// fn status(error: &BoxError) -> u16 {
///     match error.downcast_ref::<Refusal>() {
///         Some(Refusal::RateLimited(_)) => 429,
///         Some(Refusal::TimedOut(_)) => 504,
///         Some(_) => 503,
///         None => 500,
///     }
/// }
/// # let _ = status;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors;

impl<Response, E: Into<BoxError>> Respond<Response, E> for Errors {
    type Error = BoxError;

    fn refuse(&self, refusal: Refusal) -> Result<Response, BoxError> {
        Err(Box::new(refusal))
    }

    fn error(&self, error: E) -> BoxError {
        error.into()
    }
}
