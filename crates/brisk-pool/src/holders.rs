//! Who holds each checked-out connection, and since when: lock-free, because every checkout and
//! return passes through it.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots when the backend does not say its maximum size (bb8).
const UNKNOWN_MAX_SIZE: usize = 256;
const FREE: u64 = 0;
/// The tag of a checkout made outside any tokio task (`block_on`): tracked for its age only.
pub(crate) const NO_TASK: u64 = 1;
const NO_AGE: u64 = u64::MAX;

/// One slot per connection the pool may hand out. A checkout claims a free slot and writes its
/// task and start time there; the return frees it. Reading (a diagnosis, the nested-checkout
/// check) scans the slots ever used, without locking anyone out.
#[derive(Debug)]
pub(crate) struct Holders {
    slots: Box<[Holder]>,
    /// One past the highest slot ever claimed: scans stop here.
    high_water: AtomicUsize,
}

#[derive(Debug)]
struct Holder {
    /// A hash of the holding task's id, never [`FREE`]; or [`FREE`].
    task: AtomicU64,
    /// Nanoseconds since the pool was wrapped, or [`NO_AGE`] while being claimed or freed.
    since_ns: AtomicU64,
}

impl Holders {
    pub(crate) fn new(max_size: Option<usize>) -> Self {
        let slots = (0..max_size.unwrap_or(UNKNOWN_MAX_SIZE).max(1))
            .map(|_| Holder {
                task: AtomicU64::new(FREE),
                since_ns: AtomicU64::new(NO_AGE),
            })
            .collect();
        Self {
            slots,
            high_water: AtomicUsize::new(0),
        }
    }

    /// Claims a slot for `task`, starting the search at `hint` (the number of connections out:
    /// concurrent holders then start at different slots). `None` when every slot is taken (the
    /// pool grew past its size at wrapping): that checkout goes untracked.
    pub(crate) fn claim(&self, task: u64, since_ns: u64, hint: usize) -> Option<usize> {
        let len = self.slots.len();
        let start = hint % len;
        let found = (start..len).chain(0..start).find(|&at| {
            let slot = &self.slots[at].task;
            slot.load(Ordering::Relaxed) == FREE
                && slot
                    .compare_exchange(FREE, task, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        })?;
        self.slots[found]
            .since_ns
            .store(since_ns, Ordering::Release);
        // Read first: the high-water mark settles early, and a write per checkout would bounce
        // its cache line between cores.
        if self.high_water.load(Ordering::Relaxed) <= found {
            self.high_water.fetch_max(found + 1, Ordering::Relaxed);
        }
        Some(found)
    }

    pub(crate) fn release(&self, at: usize) {
        let slot = &self.slots[at];
        slot.since_ns.store(NO_AGE, Ordering::Relaxed);
        slot.task.store(FREE, Ordering::Release);
    }

    fn used(&self) -> &[Holder] {
        &self.slots[..self.high_water.load(Ordering::Relaxed)]
    }

    /// Whether `task` holds a connection now.
    pub(crate) fn holds(&self, task: u64) -> bool {
        self.used()
            .iter()
            .any(|slot| slot.task.load(Ordering::Relaxed) == task)
    }

    /// The earliest start time among the connections out, in ns since the pool was wrapped.
    pub(crate) fn oldest_ns(&self) -> Option<u64> {
        self.used()
            .iter()
            .filter(|slot| slot.task.load(Ordering::Acquire) != FREE)
            .map(|slot| slot.since_ns.load(Ordering::Acquire))
            .filter(|&since| since != NO_AGE)
            .min()
    }
}

/// A task's tag in [`Holders`]: a hash of its id, never [`FREE`] nor [`NO_TASK`].
pub(crate) fn task_tag(task: tokio::task::Id) -> u64 {
    foldhash::fast::FixedState::with_seed(0)
        .hash_one(task)
        .max(2)
}

#[cfg(test)]
mod tests {
    use super::Holders;

    #[test]
    fn claims_release_and_scans() {
        let holders = Holders::new(Some(2));
        let a = holders.claim(7, 100, 0).unwrap();
        let b = holders.claim(9, 50, 0).unwrap();
        assert_ne!(a, b);
        assert_eq!(holders.claim(11, 10, 5), None, "full: untracked");
        assert!(holders.holds(7) && holders.holds(9) && !holders.holds(11));
        assert_eq!(holders.oldest_ns(), Some(50));
        holders.release(b);
        assert!(!holders.holds(9));
        assert_eq!(holders.oldest_ns(), Some(100));
        holders.release(a);
        assert_eq!(holders.oldest_ns(), None);
    }
}
