//! The in-process store: sharded maps of theoretical arrival times with a bound on entries.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use foldhash::fast::{FixedState, RandomState};
use tokio::time::Instant;

use super::quota::{MAX_QUOTAS, Rule, Step};

/// The smallest bound a store accepts: 16 entries, room for every quota of a tier.
pub(crate) const MIN_ENTRIES: usize = 16;

/// Entries of a key's quotas after the first are the key's hash plus this, times the index.
const QUOTA_STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

/// Keys are kept as 64-bit hashes under a per-process random seed: two keys share a state only
/// if their hashes collide, which an outsider cannot aim for and which, among 10⁶ keys, happens
/// with a probability near 3·10⁻⁸.
///
/// A tier of one quota — the common case — is checked as governor checks: a compare-and-swap of
/// the key's theoretical arrival time under a shared (read) lock of its shard, so checks of one
/// hot key from many threads do not queue behind each other. The empty key (what
/// [`Global`](super::Global) gives) of such a tier skips the map altogether. Only a key's first
/// check, and a check of several quotas (all or none must count), take the shard's write lock.
#[derive(Debug)]
pub(crate) struct LocalStore {
    shards: Box<[RwLock<Shard>]>,
    /// Per tier: the state of the empty key.
    global: Box<[AtomicU64]>,
    mask: usize,
    per_shard: usize,
    hasher: RandomState,
    epoch: Instant,
}

/// Each value is a theoretical arrival time shifted left by one, its lowest bit set when the key
/// was refused since the last time its shard made room: the keys a limit is for, whose state
/// is the last to forget (a forgotten refused key would get a whole new burst).
type Shard = HashMap<u64, AtomicU64, FixedState>;

const USED: u64 = 1;

fn tat_of(value: u64) -> u64 {
    value >> 1
}

/// `tat` stored, keeping the mark of `previous`.
fn with_mark(tat: u64, previous: u64) -> u64 {
    (tat << 1) | (previous & USED)
}

impl LocalStore {
    /// A store for at most `max_entries` entries (one per key and quota); the builder makes
    /// sure `max_entries ≥ MIN_ENTRIES`, so every shard holds at least 16.
    pub(crate) fn new(max_entries: usize, tiers: usize) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, usize::from);
        let mut shards = (parallelism * 4).next_power_of_two().min(64);
        while shards > 1 && max_entries / shards < 16 {
            shards /= 2;
        }
        Self {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            global: (0..tiers).map(|_| AtomicU64::new(0)).collect(),
            mask: shards - 1,
            per_shard: max_entries / shards,
            hasher: RandomState::default(),
            epoch: Instant::now(),
        }
    }

    /// Microseconds since the store was made, on tokio's clock: paused-time tests (the user's
    /// too) refill quotas as they advance it.
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// One step of every rule for `key` in tier `tier`, written to `steps`: counted against all
    /// of them if each allows (`true`), against none otherwise.
    pub(crate) fn check(
        &self,
        tier: usize,
        rules: &[Rule],
        key: &str,
        steps: &mut [Step; MAX_QUOTAS],
    ) -> bool {
        let now = self.now();
        if let [rule] = rules {
            if key.is_empty() {
                return take(&self.global[tier], rule, now, &mut steps[0]);
            }
            let (hash, shard) = self.locate(tier, key);
            if let Some(tat) = read(shard).get(&hash) {
                return take(tat, rule, now, &mut steps[0]);
            }
            let mut map = write(shard);
            self.make_room_for(&mut map, hash, 1, now);
            let tat = map.entry(hash).or_insert_with(|| AtomicU64::new(0));
            return take(tat, rule, now, &mut steps[0]);
        }
        let (hash, shard) = self.locate(tier, key);
        let id = |i: usize| hash.wrapping_add(QUOTA_STRIDE.wrapping_mul(i as u64));
        let mut map = write(shard);
        let mut allowed = true;
        for (i, rule) in rules.iter().enumerate() {
            let tat = map
                .get(&id(i))
                .map_or(0, |t| tat_of(t.load(Ordering::Acquire)));
            steps[i] = rule.step(tat, now);
            allowed &= steps[i].allowed;
        }
        if allowed {
            self.make_room_for(&mut map, id(0), rules.len(), now);
            for (i, step) in steps.iter().enumerate().take(rules.len()) {
                let value = map.entry(id(i)).or_insert_with(|| AtomicU64::new(0));
                let previous = *value.get_mut();
                *value.get_mut() = with_mark(step.tat, previous);
            }
        } else {
            for i in 0..rules.len() {
                if let Some(value) = map.get(&id(i)) {
                    value.fetch_or(USED, Ordering::Relaxed);
                }
            }
        }
        allowed
    }

    fn locate(&self, tier: usize, key: &str) -> (u64, &RwLock<Shard>) {
        let hash = self.hasher.hash_one((tier, key));
        // Truncating the hash on 32-bit targets still picks a shard evenly.
        #[allow(clippy::cast_possible_truncation)]
        let shard = (hash as usize) & self.mask;
        (hash, &self.shards[shard])
    }

    fn make_room_for(&self, map: &mut Shard, first: u64, entries: usize, now: u64) {
        if map.len() + entries > self.per_shard && !map.contains_key(&first) {
            make_room(map, now, self.per_shard);
        }
    }

    /// Entries held now, across shards (the empty keys' states not counted).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }
}

/// Takes one unit of `rule` from the state `tat` if it has one; a compare-and-swap, so checks
/// of one key on many threads count each unit once.
fn take(value: &AtomicU64, rule: &Rule, now: u64, step: &mut Step) -> bool {
    let mut current = value.load(Ordering::Acquire);
    loop {
        *step = rule.step(tat_of(current), now);
        if !step.allowed {
            // A refused key's state must outlive the others'.
            if current & USED == 0 {
                value.fetch_or(USED, Ordering::Relaxed);
            }
            return false;
        }
        let next = with_mark(step.tat, current);
        match value.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(actual) => current = actual,
        }
    }
}

// No user code runs under these locks, so a poisoned lock holds consistent data.
fn read(shard: &RwLock<Shard>) -> std::sync::RwLockReadGuard<'_, Shard> {
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shard: &RwLock<Shard>) -> std::sync::RwLockWriteGuard<'_, Shard> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

/// Frees room in a full shard. First every entry whose time has come: it means a full quota,
/// exactly as a missing entry does, so forgetting it changes no decision. If that frees less
/// than a sixteenth of the shard, it forgets a sixteenth more: entries not refused since the
/// shard last made room, nearest to full first; every other entry loses its mark, so it goes
/// next time unless it is refused again. A key being refused — an abuser's, the state the
/// limit is for — thus outlives a flood of other keys, however many times those were admitted;
/// only when every entry was refused do those nearest to full go. A flood pays for a sweep once
/// per sixteenth, not once per key. A forgotten key that was not yet full gets its quota back early: the bound on
/// memory wins over exactness, for the keys least used.
fn make_room(shard: &mut Shard, now: u64, per_shard: usize) {
    shard.retain(|_, value| tat_of(*value.get_mut()) > now);
    let wanted = (per_shard / 16).max(MAX_QUOTAS);
    if shard.len() + wanted <= per_shard {
        return;
    }
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    for (key, value) in shard.iter_mut() {
        let value = value.get_mut();
        let entry = (tat_of(*value), *key);
        if *value & USED == 0 {
            idle.push(entry);
        } else {
            busy.push(entry);
        }
        *value &= !USED;
    }
    for list in [&mut idle, &mut busy] {
        let n = wanted.min(list.len());
        if n > 0 && n < list.len() {
            list.select_nth_unstable(n);
        }
        list.truncate(n);
    }
    let victims = idle.iter().chain(&busy).take(wanted);
    for (_, key) in victims {
        shard.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Quota;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_keys_stays_within_the_bound() {
        let store = LocalStore::new(1_000, 1);
        let rules = [Quota::per_minute(10).rule("t").unwrap()];
        for i in 0..100_000 {
            store.check(
                0,
                &rules,
                &i.to_string(),
                &mut [Step::default(); MAX_QUOTAS],
            );
            assert!(store.len() <= 1_000);
        }
        assert!(
            store.len() > 500,
            "the store keeps using its room: {}",
            store.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_smallest_store_holds_its_bound_with_every_quota() {
        let store = LocalStore::new(MIN_ENTRIES, 1);
        let rules: Vec<_> = (1..=4)
            .map(|n| Quota::per_minute(n).rule("t").unwrap())
            .collect();
        for i in 0..1_000 {
            assert!(store.check(
                0,
                &rules,
                &i.to_string(),
                &mut [Step::default(); MAX_QUOTAS]
            ));
            assert!(store.len() <= MIN_ENTRIES);
        }
        let mut steps = [Step::default(); MAX_QUOTAS];
        assert!(store.check(0, &rules[..1], "a", &mut steps));
        assert!(!store.check(0, &rules[..1], "a", &mut steps));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_go_first() {
        let store = LocalStore::new(64, 1);
        let rules = [Quota::per_second(1).rule("t").unwrap()];
        store.check(0, &rules, "hot", &mut [Step::default(); MAX_QUOTAS]);
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        for i in 0..1_000 {
            store.check(
                0,
                &rules,
                &i.to_string(),
                &mut [Step::default(); MAX_QUOTAS],
            );
        }
        assert!(store.len() <= 64);
    }
}

#[cfg(test)]
mod refused_keys_outlive_floods {
    use super::*;
    use crate::ratelimit::Quota;

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_outlives_a_flood_of_keys_admitted_up_to_their_limit() {
        let store = LocalStore::new(1000, 1);
        let rules = [Quota::per_hour(5).rule("t").unwrap()];
        let mut steps = [Step::default(); MAX_QUOTAS];
        for _ in 0..5 {
            assert!(store.check(0, &rules, "hot", &mut steps));
        }
        for i in 0..60_000u32 {
            let k = format!("k{i}");
            for _ in 0..5 {
                store.check(0, &rules, &k, &mut steps);
            }
            if i % 10 == 0 {
                tokio::time::advance(std::time::Duration::from_micros(200)).await;
                assert!(
                    !store.check(0, &rules, "hot", &mut steps),
                    "forgot at {i}, len {}",
                    store.len()
                );
            }
        }
    }
}
