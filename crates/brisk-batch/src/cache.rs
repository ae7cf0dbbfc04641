//! The loader's optional cache: a bounded map that evicts the oldest insertion first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

pub(crate) struct Cache<K, V> {
    capacity: usize,
    map: HashMap<K, (V, u64), foldhash::quality::RandomState>,
    /// Insertion order; an entry whose generation no longer matches the map's is stale.
    order: VecDeque<(K, u64)>,
    next: u64,
}

impl<K, V> Cache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: HashMap::default(),
            order: VecDeque::new(),
            next: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V> Cache<K, V> {
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(value, _)| value)
    }

    /// Stores `value` unless `key` is cached already; true if stored.
    pub(crate) fn insert_if_absent(&mut self, key: K, value: V) -> bool {
        if self.map.contains_key(&key) {
            return false;
        }
        self.insert(key, value);
        true
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        self.next += 1;
        let generation = self.next;
        self.order.push_back((key.clone(), generation));
        self.map.insert(key, (value, generation));
        while self.map.len() > self.capacity {
            let Some((oldest, generation)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&oldest).is_some_and(|(_, g)| *g == generation) {
                self.map.remove(&oldest);
            }
        }
        // Overwrites and removals leave stale entries behind; keep the queue proportional to
        // the live entries (not to the capacity, which may be near `usize::MAX`).
        if self.order.len() > self.map.len().saturating_mul(2).saturating_add(16) {
            let map = &self.map;
            self.order
                .retain(|(key, generation)| map.get(key).is_some_and(|(_, g)| g == generation));
        }
    }

    pub(crate) fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Cache;

    #[test]
    fn evicts_the_oldest_beyond_capacity() {
        let mut cache = Cache::new(2);
        cache.insert(1, "a");
        cache.insert(2, "b");
        cache.insert(3, "c");
        assert_eq!(cache.get(&1), None);
        assert_eq!(cache.get(&2), Some(&"b"));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_refreshed_key_is_not_evicted_by_its_stale_entry() {
        let mut cache = Cache::new(2);
        cache.insert(1, "a");
        cache.insert(2, "b");
        cache.remove(&1);
        cache.insert(1, "a2");
        cache.insert(3, "c"); // evicts 2, the oldest live entry; 1's stale entry is skipped
        assert_eq!(cache.get(&1), Some(&"a2"));
        assert_eq!(cache.get(&2), None);
    }

    #[test]
    fn insert_if_absent_keeps_the_first_value() {
        let mut cache = Cache::new(4);
        assert!(cache.insert_if_absent(1, "a"));
        assert!(!cache.insert_if_absent(1, "b"));
        assert_eq!(cache.get(&1), Some(&"a"));
    }

    #[test]
    fn the_order_queue_stays_bounded() {
        let mut cache = Cache::new(4);
        for i in 0..10_000 {
            cache.insert(i % 3, i);
        }
        assert!(cache.order.len() <= 2 * 3 + 16 + 1);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn a_capacity_near_usize_max_neither_overflows_nor_lets_the_queue_grow() {
        let mut cache = Cache::new(usize::MAX);
        for i in 0..10_000 {
            cache.insert(i % 3, i);
        }
        assert!(cache.order.len() <= 2 * 3 + 16 + 1);
        assert_eq!(cache.len(), 3);
    }
}
