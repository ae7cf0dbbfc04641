use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use brisk_core::deadline::{self, Bounded};

use super::{BatchWait, BulkService};
use crate::LoadError;

/// The response future of [`Batch`](super::Batch).
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    state: State<S, Req, Resp>,
}

enum State<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    Waiting {
        wait: BatchWait<S, Req, Resp>,
        index: usize,
    },
    /// The caller set a deadline; boxed so that calls without one stay small.
    Bounded {
        wait: Pin<Box<Bounded<BatchWait<S, Req, Resp>>>>,
        index: usize,
    },
    Failed(Option<LoadError<S::Error>>),
}

impl<S, Req, Resp> ResponseFuture<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    pub(crate) fn waiting(wait: BatchWait<S, Req, Resp>, index: usize) -> Self {
        let state = if deadline::current().is_some() {
            let wait = Box::pin(deadline::bounded(std::time::Duration::MAX, wait));
            State::Bounded { wait, index }
        } else {
            State::Waiting { wait, index }
        };
        Self { state }
    }

    pub(crate) fn failed(err: LoadError<S::Error>) -> Self {
        Self {
            state: State::Failed(Some(err)),
        }
    }
}

impl<S, Req, Resp> Unpin for ResponseFuture<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
}

impl<S, Req, Resp> Future for ResponseFuture<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Output = Result<Resp, LoadError<S::Error>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (outcome, index) = match &mut self.state {
            State::Failed(err) => {
                return Poll::Ready(Err(err.take().expect("polled after completion")));
            }
            State::Waiting { wait, index } => (std::task::ready!(Pin::new(wait).poll(cx)), *index),
            State::Bounded { wait, index } => match std::task::ready!(wait.as_mut().poll(cx)) {
                Ok(outcome) => (outcome, *index),
                Err(elapsed) => return Poll::Ready(Err(LoadError::Deadline(elapsed))),
            },
        };
        Poll::Ready(match &*outcome {
            // Each index belongs to one request, which takes its response once.
            Ok(responses) => responses.take(index).ok_or(LoadError::Cancelled),
            Err(err) => Err(err.clone()),
        })
    }
}

impl<S, Req, Resp> std::fmt::Debug for ResponseFuture<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
