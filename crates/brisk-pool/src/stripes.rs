//! The counters every checkout writes, striped per thread: written on one shared cache line by
//! every worker, they made each checkout wait for that line to come over from another core (the
//! largest part of what brisk added over the pool it wraps, with many tasks).
//!
//! Each thread writes the stripe it was given and each stripe has cache lines of its own; the
//! rare readers (a diagnosis, `close`, the recommended size) add the stripes up. A checkout may
//! start on one thread and end on another, so counts that go up and down are kept as two
//! monotonic counters, started and ended, each summed on its own.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per pool: threads beyond this many share one (still correct, a little slower).
const STRIPES: usize = 16;

/// Two cache lines: adjacent-line prefetch pairs lines, so one line would still be shared.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    /// Checkouts begun (counted as out from before the `closed` check) and ended.
    entered: AtomicU64,
    left: AtomicU64,
    /// Callers that began and ended waiting.
    waits_began: AtomicU64,
    waits_ended: AtomicU64,
    /// Nanoseconds spent waiting for or holding a connection in the current window.
    demand_ns: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Stripes {
    stripes: Box<[Stripe]>,
}

impl Stripes {
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }

    /// This thread's stripe.
    #[inline]
    fn mine(&self) -> &Stripe {
        &self.stripes[index()]
    }

    /// A checkout begins: `SeqCst`, so that with `closed` (also `SeqCst`) either it sees the pool
    /// closed or `close` sees it out ([`Self::in_use`]).
    #[inline]
    pub(crate) fn enter(&self) {
        self.mine().entered.fetch_add(1, Ordering::SeqCst);
    }

    /// A checkout ends (before its return reads `closed`).
    #[inline]
    pub(crate) fn leave(&self) {
        self.mine().left.fetch_add(1, Ordering::SeqCst);
    }

    /// Checkouts out or in progress. Never zero while one that began before this call is
    /// still out: every end is summed before every beginning, so each end counted has its
    /// beginning counted too. It may read high for an instant (a checkout ending meanwhile,
    /// which then sees `closed` and notifies).
    pub(crate) fn in_use(&self) -> usize {
        let left = self.sum(|stripe| &stripe.left);
        let entered = self.sum(|stripe| &stripe.entered);
        usize::try_from(entered.saturating_sub(left)).unwrap_or(usize::MAX)
    }

    pub(crate) fn begin_wait(&self) {
        self.mine().waits_began.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end_wait(&self) {
        self.mine().waits_ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Callers waiting now (may read high for an instant, as [`Self::in_use`]).
    pub(crate) fn waiting(&self) -> usize {
        let ended = self.sum(|stripe| &stripe.waits_ended);
        let began = self.sum(|stripe| &stripe.waits_began);
        usize::try_from(began.saturating_sub(ended)).unwrap_or(usize::MAX)
    }

    #[inline]
    pub(crate) fn add_demand(&self, ns: u64) {
        self.mine().demand_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The demand of the window now closing; the next starts from zero.
    pub(crate) fn take_demand(&self) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| stripe.demand_ns.swap(0, Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    fn sum(&self, counter: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| counter(stripe).load(Ordering::SeqCst))
            .fold(0, u64::wrapping_add)
    }
}

/// This thread's stripe index, given out in turn on first use: a runtime's workers each get
/// their own. Also where a checkout starts looking for a free holder slot, so that threads
/// claim apart.
#[inline]
pub(crate) fn index() -> usize {
    const UNSET: usize = usize::MAX;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(UNSET) };
    }
    INDEX.with(|index| {
        let mut at = index.get();
        if at == UNSET {
            at = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            index.set(at);
        }
        at
    })
}

#[cfg(test)]
mod tests {
    use super::Stripes;

    #[test]
    fn counts_add_up_across_threads() {
        let stripes = Stripes::new();
        stripes.enter();
        stripes.enter();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                stripes.leave(); // ends on another thread than it began
                stripes.begin_wait();
                stripes.add_demand(5);
            });
        });
        assert_eq!(stripes.in_use(), 1);
        assert_eq!(stripes.waiting(), 1);
        stripes.end_wait();
        stripes.add_demand(7);
        assert_eq!(stripes.waiting(), 0);
        assert_eq!(stripes.take_demand(), 12);
        assert_eq!(stripes.take_demand(), 0);
        stripes.leave();
        assert_eq!(stripes.in_use(), 0);
    }
}
