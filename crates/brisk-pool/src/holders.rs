//! Who holds each checked-out connection, and since when: lock-free, because every checkout and
//! return passes through it.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots when the backend does not say its maximum size (bb8).
const UNKNOWN_MAX_SIZE: usize = 256;
const FREE: u64 = 0;
/// The tag of a checkout made outside any tokio task (`block_on`): tracked for its age only.
pub(crate) const NO_TASK: u64 = 1;
pub(crate) const NO_AGE: u64 = u64::MAX;
/// A slot's word: the holder's tag in the low [`TAG_BITS`], and above them how many checkouts
/// the holding task made while holding it (confirmed, or not, when it is released).
const TAG_BITS: u32 = 48;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const NESTED_ONE: u64 = 1 << TAG_BITS;

/// A slot per connection the pool may hand out, and a few more. A checkout claims a free slot
/// as it starts (with no age yet), writes its start time there once it has a connection, and
/// the return frees it. The claimed slots are also the count of checkouts out that `close`
/// waits for: the claim is the one read-modify-write a checkout needs, the return a store.
/// Reading (a diagnosis, the nested-checkout check) scans the slots ever used, without
/// locking anyone out.
#[derive(Debug)]
pub(crate) struct Holders {
    slots: Box<[Holder]>,
    /// One past the highest slot ever claimed: scans stop here.
    high_water: AtomicUsize,
}

/// A cache line each: the holders of connections out at once (one per worker thread, say) write
/// their slots at every checkout and return, and must not bounce a shared line between them.
#[derive(Debug)]
#[repr(align(64))]
struct Holder {
    /// A hash of the holding task's id, never [`FREE`], with its nested checkouts above
    /// [`TAG_BITS`]; or [`FREE`].
    task: AtomicU64,
    /// Nanoseconds since the pool was wrapped, or [`NO_AGE`] while being claimed or freed.
    since_ns: AtomicU64,
}

impl Holders {
    pub(crate) fn new(max_size: Option<usize>) -> Self {
        // A quarter more than the connections, since checkouts in progress hold a slot too,
        // and at least as many as when the size is unknown: a pool resized later (deadpool's
        // `resize`) keeps its checkouts tracked up to that. Scans stop at the high-water mark,
        // so unused slots cost memory only.
        let max = max_size.unwrap_or(UNKNOWN_MAX_SIZE).max(1);
        Self::with_slots((max + max.div_ceil(4)).max(UNKNOWN_MAX_SIZE))
    }

    fn with_slots(slots: usize) -> Self {
        Self {
            slots: (0..slots)
                .map(|_| Holder {
                    task: AtomicU64::new(FREE),
                    since_ns: AtomicU64::new(NO_AGE),
                })
                .collect(),
            high_water: AtomicUsize::new(0),
        }
    }

    /// Claims a slot for `task`, starting the search at `hint` (the thread's stripe index:
    /// concurrent threads then start at different slots, and the slots ever used, which the
    /// nested-checkout check scans, stay few while few checkouts are out). `None` when every
    /// slot is taken: the caller counts that checkout elsewhere.
    ///
    /// `SeqCst`: with [`Self::claimed`] after `closed` is set, either a checkout's claim is seen
    /// or the checkout sees `closed` (it reads it after claiming).
    pub(crate) fn claim(&self, task: u64, since_ns: u64, hint: usize) -> Option<usize> {
        let len = self.slots.len();
        let start = hint % len;
        let found = (start..len).chain(0..start).find(|&at| {
            let slot = &self.slots[at].task;
            slot.load(Ordering::Relaxed) == FREE
                && slot
                    .compare_exchange(FREE, task, Ordering::SeqCst, Ordering::Relaxed)
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

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Records when the checkout in slot `at` got its connection.
    pub(crate) fn start(&self, at: usize, since_ns: u64) {
        self.slots[at].since_ns.store(since_ns, Ordering::Release);
    }

    /// How many slots are claimed: checkouts out or in progress. Every slot is read, not only
    /// those below the high-water mark, which a claim raises after claiming.
    pub(crate) fn claimed(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.task.load(Ordering::SeqCst) != FREE)
            .count()
    }

    /// Frees slot `at`; returns what it held: [`Released::nested`] tells whether its task asked
    /// for more connections meanwhile.
    pub(crate) fn release(&self, at: usize) -> Released {
        let slot = &self.slots[at];
        // Read, then freed: only the holding task marks its slot (`mark_nested`), and when
        // that task frees it, its marks came before; a mark racing a free on another task is
        // lost, and a checkout returned by another task is not counted anyway.
        let word = slot.task.load(Ordering::Relaxed);
        slot.since_ns.store(NO_AGE, Ordering::Relaxed);
        slot.task.store(FREE, Ordering::Release);
        Released(word)
    }

    fn used(&self) -> &[Holder] {
        &self.slots[..self.high_water.load(Ordering::Relaxed)]
    }

    /// If `task` holds a connection now, marks it (the first found) as held across one more
    /// checkout by that task, and says so.
    pub(crate) fn mark_nested(&self, task: u64) -> bool {
        self.used().iter().any(|slot| {
            let mut word = slot.task.load(Ordering::Relaxed);
            while word & TAG_MASK == task {
                let marked = if word >> TAG_BITS == u64::MAX >> TAG_BITS {
                    word // saturated
                } else {
                    word + NESTED_ONE
                };
                match slot.task.compare_exchange_weak(
                    word,
                    marked,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return true,
                    Err(now) => word = now,
                }
            }
            false
        })
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
    (foldhash::fast::FixedState::with_seed(0).hash_one(task) & TAG_MASK).max(2)
}

/// What a freed slot held.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Released(u64);

impl Released {
    /// The holding task's tag and how many checkouts it made while holding this one, when it
    /// made any.
    pub(crate) fn nested(self) -> Option<(u64, u64)> {
        let nested = self.0 >> TAG_BITS;
        (nested > 0).then_some((self.0 & TAG_MASK, nested))
    }
}

#[cfg(test)]
mod tests {
    use super::Holders;

    #[test]
    fn claims_release_and_scans() {
        let holders = Holders::with_slots(2);
        let a = holders.claim(7, 100, 0).unwrap();
        let b = holders.claim(9, 50, 0).unwrap();
        assert_ne!(a, b);
        assert_eq!(holders.claim(11, 10, 5), None, "full: untracked");
        assert!(holders.mark_nested(9) && !holders.mark_nested(11));
        assert!(holders.mark_nested(9), "marked twice");
        assert_eq!(holders.oldest_ns(), Some(50));
        assert_eq!(holders.release(b).nested(), Some((9, 2)));
        assert!(!holders.mark_nested(9));
        assert_eq!(holders.oldest_ns(), Some(100));
        assert_eq!(holders.release(a).nested(), None);
        assert_eq!(holders.oldest_ns(), None);
    }
}
