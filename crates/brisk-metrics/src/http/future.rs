use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::series::InFlight;

pin_project! {
    /// The response future of [`HttpMetrics`](super::HttpMetrics).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        in_flight: InFlight,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, in_flight: InFlight) -> Self {
        Self { inner, in_flight }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        match &result {
            Ok(response) => this.in_flight.finish(Some(response.status())),
            Err(_) => this.in_flight.finish(None),
        }
        Poll::Ready(result)
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
