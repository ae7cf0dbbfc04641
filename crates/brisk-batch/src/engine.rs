//! The batching engine shared by [`Loader`](crate::Loader) and the tower batch layer.
//!
//! A batch is first *collecting*: its owner (the loader) adds items under its own lock. It is
//! *sealed* when it is full, when its window closes, or on `flush()`; sealing turns its items
//! into one future, wrapped in [`Shared`] so that every waiter of the batch polls the same
//! future. There is no leader task and no spawn: any waiter's poll makes progress, a dropped
//! waiter leaves the others polling, and when the last waiter goes the owner forgets the batch
//! (cancelling it, or finishing it in the background, by policy).
//!
//! The collection window is closed by the batch's first waiter (its *creator*): by default it
//! yields once — so every task that was ready gets its turn to add keys — and seals on its next
//! poll; with a duration it seals when that much time has passed. If the creator is dropped
//! while collecting it seals on the way out, so the others never wait for it.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::BuildError;
use tokio::time::{Instant, Sleep};

/// The shared future of a sealed batch.
pub(crate) type Job<O> = Shared<BoxFuture<'static, O>>;

/// What happens to a batch whose every waiter has gone before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Abandoned {
    /// Drop the batch's future: the batch function is cancelled at its next await. The default.
    #[default]
    Cancel,
    /// Finish it on a spawned tokio task (when a runtime is present), so the work already sent
    /// to the database is not wasted and its results reach the cache.
    Finish,
}

/// The limits every batcher takes from its builder, checked in one place.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_batch_size: usize,
    pub(crate) window: Option<Duration>,
    pub(crate) max_concurrent_batches: usize,
    pub(crate) max_queued_batches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_size: 500,
            window: None,
            max_concurrent_batches: 10,
            max_queued_batches: 1_000,
        }
    }
}

impl Limits {
    /// A zero size or limit, or a zero window, is a build error.
    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        for (value, why) in [
            (self.max_batch_size, "max_batch_size must be at least 1"),
            (
                self.max_concurrent_batches,
                "max_concurrent_batches must be at least 1",
            ),
            (
                self.max_queued_batches,
                "max_queued_batches must be at least 1",
            ),
        ] {
            if value == 0 {
                return Err(BuildError(why));
            }
        }
        if self.window.is_some_and(|window| window.is_zero()) {
            return Err(BuildError(
                "window must be positive; leave it unset to batch per scheduler turn",
            ));
        }
        Ok(())
    }

    /// The semaphore that bounds batches in flight.
    pub(crate) fn slots(&self) -> Arc<tokio::sync::Semaphore> {
        let permits = self
            .max_concurrent_batches
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Arc::new(tokio::sync::Semaphore::new(permits))
    }

    pub(crate) fn settings(&self, abandoned: Abandoned) -> Settings {
        Settings {
            max_batch_size: self.max_batch_size,
            window: self.window,
            abandoned,
        }
    }
}

/// Engine settings that do not depend on what is batched.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_batch_size: usize,
    pub(crate) window: Option<Duration>,
    pub(crate) abandoned: Abandoned,
}

/// The owner of batches: it keeps the collecting batch and its items under its own lock.
pub(crate) trait Owner: Send + Sync + Sized + 'static {
    type Item: Send + 'static;
    type Output: Clone + Send + Sync + 'static;

    /// If `batch` is still collecting, detaches it and returns its items.
    fn take_items(&self, batch: &Batch<Self::Output>) -> Option<Vec<Self::Item>>;

    /// The future that runs one batch.
    fn run(
        self: &Arc<Self>,
        batch: &Batch<Self::Output>,
        items: Vec<Self::Item>,
    ) -> BoxFuture<'static, Self::Output>;

    /// Every waiter of `batch` left: drop whatever still points at it. Called with no lock held.
    fn forget(&self, batch: &Arc<Batch<Self::Output>>);

    fn settings(&self) -> &Settings;
}

impl Settings {
    /// Whether a batch holding `len` items must be sealed now: it is full, or the caller's
    /// deadline is nearer than the rest of the window.
    pub(crate) fn seal_now<O: Clone>(&self, batch: &Batch<O>, len: usize) -> bool {
        len >= self.max_batch_size
            || self.window.is_some_and(|window| {
                brisk_core::deadline::remaining()
                    .is_some_and(|left| left < window.saturating_sub(batch.created.elapsed()))
            })
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while one of our locks is held, so a poisoned lock still holds valid state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One batch.
pub(crate) struct Batch<O> {
    pub(crate) id: u64,
    pub(crate) created: Instant,
    inner: Mutex<Inner<O>>,
    waiters: AtomicUsize,
}

enum Inner<O> {
    Collecting { wakers: Vec<Waker> },
    Sealed(Job<O>),
    Forgotten,
}

impl<O: Clone> Batch<O> {
    pub(crate) fn new(id: u64) -> Self {
        Self {
            id,
            created: Instant::now(),
            inner: Mutex::new(Inner::Collecting { wakers: Vec::new() }),
            waiters: AtomicUsize::new(0),
        }
    }

    /// How many waiters hold this batch.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// True once the batch's future has produced its output.
    pub(crate) fn finished(&self) -> bool {
        matches!(&*lock(&self.inner), Inner::Sealed(job) if job.peek().is_some())
    }

    /// Drops (or, by policy, spawns) the job of a batch nobody waits for any more.
    pub(crate) fn abandon(&self, policy: Abandoned)
    where
        O: Send + Sync + 'static,
    {
        let previous = std::mem::replace(&mut *lock(&self.inner), Inner::Forgotten);
        if let (Inner::Sealed(job), Abandoned::Finish) = (previous, policy)
            && job.peek().is_none()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(job);
        }
    }
}

/// Seals `batch` if it is still collecting.
pub(crate) fn seal<W: Owner>(owner: &Arc<W>, batch: &Batch<W::Output>) {
    if let Some(items) = owner.take_items(batch) {
        seal_with(owner, batch, items);
    }
}

/// Seals `batch` with `items` already taken from it, and wakes its waiters.
pub(crate) fn seal_with<W: Owner>(owner: &Arc<W>, batch: &Batch<W::Output>, items: Vec<W::Item>) {
    let job = owner.run(batch, items).shared();
    let wakers = {
        let mut inner = lock(&batch.inner);
        match std::mem::replace(&mut *inner, Inner::Sealed(job)) {
            Inner::Collecting { wakers } => wakers,
            // Sealed twice cannot happen (items are taken once); keep what was there.
            other => {
                *inner = other;
                Vec::new()
            }
        }
    };
    wakers.into_iter().for_each(Waker::wake);
}

/// A waiter of one batch: resolves to the batch's shared output, `O` (always `W::Output`;
/// spelled apart so that public futures can hold a `Wait` without naming this crate's traits).
pub(crate) struct Wait<W, O> {
    owner: Arc<W>,
    batch: Arc<Batch<O>>,
    state: State<O>,
    /// `release::<W, O>`: `Drop` cannot ask for `W: Owner`, so `new` (which can) stores it.
    release: fn(&Arc<W>, &Arc<Batch<O>>, &State<O>),
}

enum State<O> {
    Collecting {
        creator: bool,
        yielded: bool,
        sleep: Option<Pin<Box<Sleep>>>,
    },
    Running(Job<O>),
    Done,
}

impl<W: Owner<Output = O>, O: Clone> Wait<W, O> {
    /// Registers a waiter; `creator` is the one that closes the collection window.
    pub(crate) fn new(owner: Arc<W>, batch: Arc<Batch<O>>, creator: bool) -> Self {
        batch.waiters.fetch_add(1, Ordering::AcqRel);
        Self {
            release: release::<W, O>,
            owner,
            batch,
            state: State::Collecting {
                creator,
                yielded: false,
                sleep: None,
            },
        }
    }
}

impl<W, O> Unpin for Wait<W, O> {}

impl<W: Owner<Output = O>, O: Clone> std::future::Future for Wait<W, O> {
    type Output = O;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Collecting {
                    creator,
                    yielded,
                    sleep,
                } => {
                    {
                        let mut inner = lock(&this.batch.inner);
                        match &mut *inner {
                            Inner::Sealed(job) => {
                                let job = job.clone();
                                drop(inner);
                                this.state = State::Running(job);
                                continue;
                            }
                            Inner::Collecting { wakers } if !*creator => {
                                wakers.push(cx.waker().clone());
                                return Poll::Pending;
                            }
                            Inner::Collecting { .. } => {}
                            // A batch is forgotten only when it has no waiter, and we are one.
                            Inner::Forgotten => {
                                unreachable!("a batch with a waiter is never forgotten")
                            }
                        }
                    }
                    let due = match this.owner.settings().window {
                        // Yield once so every ready task gets its turn, then seal: a wake from
                        // inside poll puts this task at the back of tokio's run queue.
                        None if *yielded => true,
                        None => {
                            *yielded = true;
                            cx.waker().wake_by_ref();
                            false
                        }
                        Some(window) => {
                            let at = this.batch.created + window;
                            let sleep =
                                sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                            sleep.as_mut().poll(cx).is_ready()
                        }
                    };
                    if !due {
                        return Poll::Pending;
                    }
                    seal(&this.owner, &this.batch);
                }
                State::Running(job) => {
                    let output = std::task::ready!(Pin::new(job).poll(cx));
                    this.state = State::Done;
                    return Poll::Ready(output);
                }
                State::Done => panic!("a batch wait was polled after it completed"),
            }
        }
    }
}

impl<W, O> Drop for Wait<W, O> {
    fn drop(&mut self) {
        (self.release)(&self.owner, &self.batch, &self.state);
    }
}

/// A waiter leaves its batch.
fn release<W: Owner<Output = O>, O: Clone>(
    owner: &Arc<W>,
    batch: &Arc<Batch<O>>,
    state: &State<O>,
) {
    if let State::Collecting { creator: true, .. } = state {
        // The window is ours to close: close it now so the others are not left waiting.
        seal(owner, batch);
    }
    let last = batch.waiters.fetch_sub(1, Ordering::AcqRel) == 1;
    // A waiter that got its output saw the batch finish: there is nothing left to forget.
    if last && !matches!(state, State::Done) {
        owner.forget(batch);
    }
}

/// Counts a sealed batch as queued until it gets a slot or is dropped.
pub(crate) struct Queued(Arc<AtomicUsize>);

impl Queued {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The text of a panic payload, when it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
