//! The in-process store: sharded maps of theoretical arrival times with a bound on entries.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};

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
#[derive(Debug)]
pub(crate) struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    per_shard: usize,
    hasher: RandomState,
    epoch: Instant,
}

type Shard = HashMap<u64, u64, FixedState>;

impl LocalStore {
    /// A store for at most `max_entries` entries (one per key and quota); the builder makes
    /// sure `max_entries ≥ MIN_ENTRIES`, so every shard holds at least 16.
    pub(crate) fn new(max_entries: usize) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, usize::from);
        let mut shards = (parallelism * 4).next_power_of_two().min(64);
        while shards > 1 && max_entries / shards < 16 {
            shards /= 2;
        }
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            mask: shards - 1,
            per_shard: max_entries / shards,
            hasher: RandomState::default(),
            epoch: Instant::now(),
        }
    }

    /// Microseconds since the store was made, on tokio's clock (so paused-time tests drive it).
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// One step of every rule for `key` in tier `tier`: counted against all of them if each
    /// allows, against none otherwise.
    pub(crate) fn check(
        &self,
        tier: usize,
        rules: &[Rule],
        key: &str,
    ) -> ([Step; MAX_QUOTAS], bool) {
        let hash = self.hasher.hash_one((tier, key));
        let id = |i: usize| hash.wrapping_add(QUOTA_STRIDE.wrapping_mul(i as u64));
        let now = self.now();
        let mut steps = [Step::default(); MAX_QUOTAS];
        let mut allowed = true;
        // No user code runs under the lock, so a poisoned lock holds consistent data.
        // Truncating the hash on 32-bit targets still picks a shard evenly.
        #[allow(clippy::cast_possible_truncation)]
        let shard = (hash as usize) & self.mask;
        let mut shard = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, rule) in rules.iter().enumerate() {
            let tat = shard.get(&id(i)).copied().unwrap_or(0);
            steps[i] = rule.step(tat, now);
            allowed &= steps[i].allowed;
        }
        if allowed {
            if shard.len() + rules.len() > self.per_shard {
                make_room(&mut shard, now, self.per_shard);
            }
            for (i, step) in steps.iter().enumerate().take(rules.len()) {
                shard.insert(id(i), step.tat);
            }
        }
        (steps, allowed)
    }

    /// Entries held now, across shards.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Frees room in a full shard. First every entry whose time has come: it means a full quota,
/// exactly as a missing entry does, so forgetting it changes no decision. If that frees less
/// than a sixteenth of the shard, it also forgets a sixteenth: those nearest to full among a
/// sample four times as large, so a flood of new keys pays for a scan once per sixteenth, not
/// once per key. A forgotten key that was not yet full gets its quota back early: the bound on
/// memory wins over exactness, for the keys least used.
fn make_room(shard: &mut Shard, now: u64, per_shard: usize) {
    shard.retain(|_, tat| *tat > now);
    let wanted = (per_shard / 16).max(MAX_QUOTAS);
    if shard.len() + wanted <= per_shard {
        return;
    }
    let mut sample: Vec<(u64, u64)> = shard
        .iter()
        .map(|(k, t)| (*t, *k))
        .take(wanted * 4)
        .collect();
    sample.sort_unstable();
    for (_, key) in sample.into_iter().take(wanted) {
        shard.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Quota;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_keys_stays_within_the_bound() {
        let store = LocalStore::new(1_000);
        let rules = [Quota::per_minute(10).rule("t").unwrap()];
        for i in 0..100_000 {
            store.check(0, &rules, &i.to_string());
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
        let store = LocalStore::new(MIN_ENTRIES);
        let rules: Vec<_> = (1..=4)
            .map(|n| Quota::per_minute(n).rule("t").unwrap())
            .collect();
        for i in 0..1_000 {
            assert!(store.check(0, &rules, &i.to_string()).1);
            assert!(store.len() <= MIN_ENTRIES);
        }
        assert!(store.check(0, &rules[..1], "a").1);
        assert!(!store.check(0, &rules[..1], "a").1);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_go_first() {
        let store = LocalStore::new(64);
        let rules = [Quota::per_second(1).rule("t").unwrap()];
        store.check(0, &rules, "hot");
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        for i in 0..1_000 {
            store.check(0, &rules, &i.to_string());
        }
        assert!(store.len() <= 64);
    }
}
