//! The batching engine shared by [`Loader`](crate::Loader) and the tower batch layer.
//!
//! Every batch runs on its own tokio task, spawned when its first item arrives: the task waits
//! for the collection window (one scheduler turn by default, or a duration) unless the batch is
//! sealed sooner (full, `flush()`, a near deadline), takes a concurrency slot, runs the batch and
//! stores its outcome in the batch and wakes every waiter.
//!
//! Why a task and not the waiters themselves (the design before 0.1 landed): a batch driven by
//! whichever waiter polls it runs under that waiter's task-locals (its deadline became the whole
//! batch's), needs its first waiter to be polled (a never-polled first call hung the layer), and
//! a panic there poisoned the shared future for everyone. On its own task a batch has no
//! caller's task-locals, progresses whether or not anyone polls, and a panic anywhere in it
//! becomes an error for its waiters. The price is one spawn per *batch* (not per load), which
//! the benchmarks in `docs/performance.md` measure.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::{self, Either, FutureExt};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::Setting;
use crate::{BuildError, LoadError};

tokio::task_local! {
    /// The batch whose function (or batch layer's inner service) the current task runs.
    ///
    /// A request made from there waits on another batch, which two things must know. The
    /// concurrency limit: such a batch takes no slot, since its requester holds one and waits
    /// for it (with every slot held that way — a recursive loader, a cycle through loaders —
    /// nothing would progress); the limit bounds the batches requested from outside any batch,
    /// which the nested ones hang from. And deduplication: a key already in a batch that
    /// (transitively) waits on the requester must not join that batch, which could then never
    /// finish; it is loaded again in a batch of its own.
    static CURRENT: Arc<Lineage>;
}

/// Which batches wait on a batch: its requesters, the batches whose functions asked it for a
/// key. Parents are kept as long as the batch is referenced, so ancestry is read through them.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    parents: Mutex<Vec<Arc<Lineage>>>,
}

impl Lineage {
    /// Whether `self` is `other` or waits on it, through any chain of requests.
    fn descends_from(self: &Arc<Self>, other: &Arc<Self>) -> bool {
        let mut seen: Vec<*const Lineage> = Vec::new();
        let mut stack = vec![Arc::clone(self)];
        while let Some(node) = stack.pop() {
            if Arc::ptr_eq(&node, other) {
                return true;
            }
            let ptr = Arc::as_ptr(&node);
            if seen.contains(&ptr) {
                continue;
            }
            seen.push(ptr);
            stack.extend(lock(&node.parents).iter().cloned());
        }
        false
    }
}

/// The batch whose function the current task runs, if any.
pub(crate) fn requester() -> Option<Arc<Lineage>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Runs `future` as part of the batch function the current task runs, if any: loads it makes
/// count as made from inside that batch function.
///
/// A batch function's own loads are known to be nested; loads made on tasks it spawns are not,
/// since a spawned task inherits no task-local. Wrap a future you spawn from a batch function
/// that loads (from the same loader, or one that loads back) in this, so that with every
/// concurrency slot held by its ancestors it still progresses. Outside a batch function it
/// changes nothing.
///
/// ```
/// # async fn demo(loader: brisk_batch::Loader<u32, u32, impl brisk_batch::BatchFn<u32, u32>>) {
/// let child = tokio::spawn(brisk_batch::within_batch(async move { loader.load(7).await }));
/// # let _ = child;
/// # }
/// ```
pub fn within_batch<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let requester = requester();
    async move {
        match requester {
            Some(requester) => CURRENT.scope(requester, future).await,
            None => future.await,
        }
    }
}

/// What happens to a batch whose every waiter has gone before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Abandoned {
    /// Cancel the batch's task: the batch function is dropped at its next await. The default.
    #[default]
    Cancel,
    /// Let it finish, so the work already sent to the database is not wasted and its results
    /// reach the cache.
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
    /// A zero size or limit, or a zero window, is a build error. Large values are fine: every
    /// use of them saturates.
    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        for (value, setting) in [
            (self.max_batch_size, Setting::MaxBatchSize),
            (self.max_concurrent_batches, Setting::MaxConcurrentBatches),
            (self.max_queued_batches, Setting::MaxQueuedBatches),
        ] {
            if value == 0 {
                return Err(BuildError::Zero(setting));
            }
        }
        if self.window.is_some_and(|window| window.is_zero()) {
            return Err(BuildError::Zero(Setting::Window));
        }
        Ok(())
    }

    pub(crate) fn engine(&self, abandoned: Abandoned) -> Engine {
        let permits = self.max_concurrent_batches.min(Semaphore::MAX_PERMITS);
        Engine {
            max_batch_size: self.max_batch_size,
            window: self.window,
            abandoned,
            slots: Semaphore::new(permits),
            max_queued: self.max_queued_batches,
            queued: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        }
    }
}

/// What every owner of batches keeps: its settings and the bounds on its batches.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) max_batch_size: usize,
    pub(crate) window: Option<Duration>,
    pub(crate) abandoned: Abandoned,
    slots: Semaphore,
    max_queued: usize,
    /// Batches whose task found no free slot and waits for one.
    queued: AtomicUsize,
    next_id: AtomicU64,
}

/// The shared outcome of one batch.
pub(crate) type Outcome<T, E> = Arc<Result<T, LoadError<E>>>;

/// The owner of batches (a loader, a batch layer): it keeps the collecting batch under its own
/// lock and knows how to run one.
pub(crate) trait Owner: Send + Sync + Sized + 'static {
    type Item: Send + 'static;
    type Done: Send + Sync + 'static;
    type Error: Send + Sync + 'static;

    fn engine(&self) -> &Engine;

    /// Whether a batch's age is wanted (a queue-wait metric with a recorder to record into).
    fn timed(&self) -> bool {
        false
    }

    /// If `batch` is still the collecting one, detaches it and returns its items. (If not, it
    /// was sealed with its items, under the owner's lock.)
    fn detach(&self, batch: &OwnedBatch<Self>) -> Option<Vec<Self::Item>>;

    /// Runs a sealed batch, on the batch's own task. A panic anywhere inside, including before
    /// the future is returned, fails the batch with [`LoadError::Panicked`].
    fn run(
        self: &Arc<Self>,
        batch: &Arc<OwnedBatch<Self>>,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Self::Done, LoadError<Self::Error>>> + Send + 'static;

    /// Every waiter of `batch` left before it finished (called only under
    /// [`Abandoned::Cancel`], with no lock held, from a waiter's `Drop`: must not panic).
    fn forget(&self, batch: &Arc<OwnedBatch<Self>>);

    /// The task of `batch` ended before running it (cancelled while collecting or waiting for
    /// a slot): `items` never reached the batch function. Runs inside the task's drop.
    fn unrun(&self, batch: &OwnedBatch<Self>, items: Vec<Self::Item>);
}

/// A batch of an owner `W`.
pub(crate) type OwnedBatch<W> =
    Batch<<W as Owner>::Item, Outcome<<W as Owner>::Done, <W as Owner>::Error>>;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Our locks guard no user code that could leave them half-updated (user callbacks that run
    // under one are contained with `catch_unwind`), so a poisoned lock still holds valid state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f`, turning a panic into [`LoadError::Panicked`].
pub(crate) fn contain<T, E>(f: impl FnOnce() -> T) -> Result<T, LoadError<E>> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| LoadError::panicked(&*panic))
}

/// One batch.
pub(crate) struct Batch<I, O> {
    pub(crate) id: u64,
    /// When it was created: read only when a window or a metric needs it.
    created: Option<Instant>,
    /// Items, outcome, waiters' wakers and the task: one lock for all of a batch's hand-offs.
    slot: Mutex<Slot<I, O>>,
    /// Sealed early (full, flushed, a waiter's deadline near): the task stops waiting.
    sealed: AtomicBool,
    sealed_notify: Notify,
    /// A request from inside a batch function waits for it: skip the slot.
    nested: AtomicBool,
    nested_notify: Notify,
    /// The batches that wait on this one.
    lineage: Arc<Lineage>,
    /// The window's timer, made when the batch was (so that a runtime without timers is an
    /// error for the first load, not a panic in the batch's task).
    sleep: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
    /// Keys may repeat: one was detached from this batch while it collected (see `prime`).
    pub(crate) gaps: AtomicBool,
    /// Forgotten by its owner: a new request must not join it.
    abandoned: AtomicBool,
    waiters: AtomicUsize,
}

struct Slot<I, O> {
    /// Filled when the batch is sealed; emptied by its task.
    items: Vec<I>,
    /// The outcome, once the task sent it.
    output: Option<O>,
    /// The task ended without an outcome (cancelled).
    ended: bool,
    /// Waiters to wake with the outcome; a waiter keeps its index.
    wakers: Wakers,
    task: Option<AbortHandle>,
}

impl<I, O: Clone> Batch<I, O> {
    /// How many waiters hold this batch.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// False once its owner gave it up: requests must start a new batch instead of joining.
    pub(crate) fn joinable(&self) -> bool {
        !self.abandoned.load(Ordering::Acquire)
    }

    /// Hands the batch its items and tells its task to stop collecting.
    pub(crate) fn seal(&self, items: Vec<I>) {
        lock(&self.slot).items = items;
        self.sealed.store(true, Ordering::Release);
        self.sealed_notify.notify_one();
    }

    /// Whether `requester`'s batch (a batch function asking for a key) may wait on this batch:
    /// not if this batch waits on it already, which would be a cycle.
    pub(crate) fn may_serve(&self, requester: Option<&Arc<Lineage>>) -> bool {
        requester.is_none_or(|requester| !requester.descends_from(&self.lineage))
    }

    /// Records that `requester` (from inside a batch function) waits on this batch.
    pub(crate) fn serves(&self, requester: Option<&Arc<Lineage>>) {
        if let Some(requester) = requester {
            // Once per requester: a batch function loading many keys joins many times.
            let mut parents = lock(&self.lineage.parents);
            if !parents.iter().any(|parent| Arc::ptr_eq(parent, requester)) {
                parents.push(Arc::clone(requester));
            }
            drop(parents);
            self.make_nested();
        }
    }

    /// A request from inside a batch function waits for it: the batch must not wait for a slot
    /// that its requester's batch may hold.
    fn make_nested(&self) {
        if !self.nested.swap(true, Ordering::AcqRel) {
            self.nested_notify.notify_one();
        }
    }

    /// Marks the batch given up: requests must no longer join it. Call it under the owner's
    /// lock, where requests join.
    pub(crate) fn give_up(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    /// Cancels the task of a batch given up.
    pub(crate) fn cancel(&self) {
        if let Some(task) = lock(&self.slot).task.take() {
            task.abort();
        }
    }

    fn take_items(&self) -> Vec<I> {
        std::mem::take(&mut lock(&self.slot).items)
    }

    /// Ends the batch: stores its outcome (none if cancelled) and wakes every waiter.
    fn end(&self, output: Option<O>) {
        let wakers = {
            let mut slot = lock(&self.slot);
            slot.ended = true;
            slot.output = output;
            slot.task = None;
            std::mem::take(&mut slot.wakers)
        };
        wakers.wake_all();
    }

    /// Waits for the collection window to close, or for an early seal.
    async fn window(&self, window: Option<Duration>) {
        if self.sealed.load(Ordering::Acquire) {
            return;
        }
        match window {
            // One turn is as short as a wait gets: nothing to cut short.
            None => YieldOnce(false).await,
            Some(window) => {
                let sealed = std::pin::pin!(self.sealed_notify.notified());
                let sleep = lock(&self.sleep).take();
                let closed = std::pin::pin!(async move {
                    match sleep {
                        Some(sleep) => sleep.await,
                        None => tokio::time::sleep(window).await,
                    }
                });
                future::select(sealed, closed).await;
            }
        }
    }

    /// A concurrency slot, or none for a nested batch.
    async fn slot<'a>(&self, engine: &'a Engine) -> Option<SemaphorePermit<'a>> {
        let slots = &engine.slots;
        if self.nested.load(Ordering::Acquire) {
            return None;
        }
        if let Ok(permit) = slots.try_acquire() {
            return Some(permit);
        }
        // Queued from here until a slot is free (or the batch goes).
        let _queued = Queued::new(&engine.queued);
        let acquire = std::pin::pin!(slots.acquire());
        let nested = std::pin::pin!(self.nested_notify.notified());
        match future::select(acquire, nested).await {
            // The semaphore is never closed.
            Either::Left((permit, _)) => permit.ok(),
            Either::Right(_) => None,
        }
    }
}

/// The wakers of a batch's waiters. The first is kept inline: most batches of a lightly loaded
/// service have one waiter, and the allocation of a vector showed in its latency.
#[derive(Default)]
struct Wakers {
    first: Option<Waker>,
    rest: Vec<Waker>,
}

impl Wakers {
    /// Stores `waker` at `index` (a waiter's earlier place) or at a new place; returns it.
    fn register(&mut self, index: Option<usize>, waker: &Waker) -> usize {
        let place = match index {
            Some(0) => self.first.as_mut(),
            Some(index) => self.rest.get_mut(index - 1),
            None => None,
        };
        if let (Some(index), Some(old)) = (index, place) {
            if !old.will_wake(waker) {
                old.clone_from(waker);
            }
            return index;
        }
        if self.first.is_none() {
            self.first = Some(waker.clone());
            return 0;
        }
        self.rest.push(waker.clone());
        self.rest.len()
    }

    fn wake_all(self) {
        self.first
            .into_iter()
            .chain(self.rest)
            .for_each(Waker::wake);
    }
}

/// Ready on its second poll, after one trip through the scheduler's run queue: every task that
/// was ready when the batch started gets its turn to add keys — also those woken after the
/// batch's task was spawned (on a multi-thread runtime, tokio may even run that task right after
/// its creator). Measured (`benches/batch_workers.rs`): without it, loaders on current-thread
/// runtimes made 42% more batches. (`tokio::task::yield_now` would
/// also wait for the I/O driver, a system call per batch.)
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A new batch, and what starts its task.
pub(crate) type Created<W> = (Arc<OwnedBatch<W>>, Starter<W>);

/// Creates a batch. Fails when `max_queued_batches` batches wait for a slot, or when there is
/// no runtime (or, for a window, no timer) to run it on.
pub(crate) fn create<W: Owner>(owner: &W) -> Result<Created<W>, LoadError<W::Error>> {
    let engine = owner.engine();
    if engine.queued.load(Ordering::Acquire) >= engine.max_queued {
        return Err(LoadError::Overloaded);
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| LoadError::NoRuntime)?;
    let sleep = match engine.window {
        // Made here: `sleep` panics on a runtime built without timers.
        Some(window) => Some(
            std::panic::catch_unwind(|| Box::pin(tokio::time::sleep(window)))
                .map_err(|_| LoadError::NoTimer)?,
        ),
        None => None,
    };
    let created = (engine.window.is_some() || owner.timed()).then(Instant::now);
    let batch = Arc::new(Batch {
        id: engine.next_id.fetch_add(1, Ordering::Relaxed),
        created,
        slot: Mutex::new(Slot {
            items: Vec::new(),
            output: None,
            ended: false,
            wakers: Wakers::default(),
            task: None,
        }),
        sealed: AtomicBool::new(false),
        sealed_notify: Notify::new(),
        nested: AtomicBool::new(false),
        nested_notify: Notify::new(),
        lineage: Arc::default(),
        sleep: Mutex::new(sleep),
        gaps: AtomicBool::new(false),
        abandoned: AtomicBool::new(false),
        waiters: AtomicUsize::new(0),
    });
    let starter = Starter {
        runtime,
        _owner: std::marker::PhantomData,
    };
    Ok((batch, starter))
}

/// Starts a created batch's task; call it once the owner's lock is released.
pub(crate) struct Starter<W: Owner> {
    runtime: tokio::runtime::Handle,
    _owner: std::marker::PhantomData<fn(W)>,
}

impl<W: Owner> Starter<W> {
    pub(crate) fn start(self, owner: &Arc<W>, batch: &Arc<OwnedBatch<W>>) {
        // The guard is an argument, so it goes with the future even if the task is dropped
        // before its first poll (a runtime shutting down).
        let ending = Ending {
            owner: Arc::clone(owner),
            batch: Arc::clone(batch),
            items: None,
            armed: true,
        };
        let task = self.runtime.spawn(drive(ending));
        let mut slot = lock(&batch.slot);
        // The task may have ended already (it cannot have been abandoned: its creator still
        // waits on it); then there is nothing to abort.
        if !slot.ended {
            slot.task = Some(task.abort_handle());
        }
    }
}

/// The life of one batch, on its own task.
async fn drive<W: Owner>(mut guard: Ending<W>) {
    let (owner, batch) = (&guard.owner, &guard.batch);
    let engine = owner.engine();
    batch.window(engine.window).await;
    guard.items = Some(owner.detach(batch).unwrap_or_else(|| batch.take_items()));
    let slot = batch.slot(engine).await;
    let items = guard.items.take().unwrap_or_default();
    let run = AssertUnwindSafe(async { owner.run(batch, items).await }).catch_unwind();
    let outcome = CURRENT
        .scope(Arc::clone(&batch.lineage), run)
        .await
        .unwrap_or_else(|panic| Err(LoadError::panicked(&*panic)));
    drop(slot);
    guard.armed = false;
    batch.end(Some(Arc::new(outcome)));
}

/// Ends a batch whose task is dropped before it answered (cancelled, its runtime shut down,
/// or never polled): items that never reached `run` go back to the owner, and the waiters are
/// told.
struct Ending<W: Owner> {
    owner: Arc<W>,
    batch: Arc<OwnedBatch<W>>,
    /// The items, between their taking from the owner and `run`.
    items: Option<Vec<W::Item>>,
    /// False once the batch answered.
    armed: bool,
}

impl<W: Owner> Drop for Ending<W> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Once `run` has the items, detaching finds nothing and the batch holds none: `unrun`
        // then gets an empty list (`run`'s own guard released its keys).
        let items = match self.items.take() {
            Some(items) => items,
            None => (self.owner.detach(&self.batch)).unwrap_or_else(|| self.batch.take_items()),
        };
        self.owner.unrun(&self.batch, items);
        self.batch.end(None);
    }
}

/// A waiter of one batch: resolves to the batch's shared outcome.
pub(crate) struct Wait<W: Owner> {
    owner: Arc<W>,
    batch: Arc<OwnedBatch<W>>,
    /// This waiter's place in the batch's wakers, once it waited.
    waker: Option<usize>,
    done: bool,
}

impl<W: Owner> Wait<W> {
    /// Registers a waiter of `batch`. Call it under the owner's lock, where `forget` checks the
    /// count.
    pub(crate) fn new(owner: &Arc<W>, batch: &Arc<OwnedBatch<W>>) -> Self {
        batch.waiters.fetch_add(1, Ordering::AcqRel);
        Self {
            owner: Arc::clone(owner),
            batch: Arc::clone(batch),
            waker: None,
            done: false,
        }
    }
}

impl<W: Owner> Unpin for Wait<W> {}

impl<W: Owner> Future for Wait<W> {
    type Output = Outcome<W::Done, W::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut slot = lock(&this.batch.slot);
        if let Some(output) = &slot.output {
            let output = Arc::clone(output);
            drop(slot);
            this.done = true;
            return Poll::Ready(output);
        }
        if slot.ended {
            // The task ended without an outcome: its runtime shut down, or it was abandoned
            // while this waiter raced in.
            drop(slot);
            this.done = true;
            return Poll::Ready(Arc::new(Err(LoadError::Cancelled)));
        }
        this.waker = Some(slot.wakers.register(this.waker, cx.waker()));
        Poll::Pending
    }
}

impl<W: Owner> Drop for Wait<W> {
    fn drop(&mut self) {
        let last = self.batch.waiters.fetch_sub(1, Ordering::AcqRel) == 1;
        // A waiter that got its output saw the batch finish: there is nothing left to forget.
        if last && !self.done && self.owner.engine().abandoned == Abandoned::Cancel {
            self.owner.forget(&self.batch);
        }
    }
}

/// Counts a batch as queued (waiting for a slot) while it lives.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    /// Whether a batch holding `len` items must be sealed now: it is full, or the caller's
    /// deadline is nearer than the rest of the window.
    pub(crate) fn seal_now<I, O>(&self, batch: &Batch<I, O>, len: usize) -> bool {
        len >= self.max_batch_size
            || self
                .window
                .zip(batch.created)
                .is_some_and(|(window, created)| {
                    brisk_core::deadline::remaining()
                        .is_some_and(|left| left < window.saturating_sub(created.elapsed()))
                })
    }

    /// How long ago the batch was created, if that was read (see [`Owner::timed`]).
    pub(crate) fn age<I, O>(batch: &Batch<I, O>) -> Option<Duration> {
        batch.created.map(|created| created.elapsed())
    }
}
