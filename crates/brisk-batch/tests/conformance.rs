//! The behaviours of the reference DataLoader's test suite (graphql/dataloader,
//! `src/__tests__/`), in Rust.
//!
//! Where JavaScript says "the same tick" (promises created before the event loop turns), Rust
//! says "the same scheduler turn": futures polled together, as `tokio::join!` does. Where it
//! says "a later tick", Rust awaits the first load before starting the next.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use brisk_batch::{BatchFn, LoadError, Loader};
use common::{Boom, Echo, taken};

fn loader<K>(echo: Echo<K>) -> Loader<K, String, Echo<K>>
where
    K: std::hash::Hash + Eq + Clone + std::fmt::Display + Send + Sync + 'static,
{
    Loader::new(echo)
}

// 1.
#[tokio::test]
async fn one_load_resolves_and_two_in_one_turn_share_a_batch() {
    let (echo, batches) = Echo::new();
    let loader = loader(echo);
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("1"));
    let (a, b) = tokio::join!(loader.load(1), loader.load(2));
    assert_eq!(
        (a.unwrap().unwrap(), b.unwrap().unwrap()),
        ("1".into(), "2".into())
    );
    assert_eq!(taken(&batches), vec![vec![1], vec![1, 2]]);
}

// 2.
#[tokio::test]
async fn max_batch_size_splits_batches() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).max_batch_size(2).build().unwrap();
    let (a, b, c) = tokio::join!(loader.load(1), loader.load(2), loader.load(3));
    assert_eq!([a, b, c].map(|r| r.unwrap().unwrap()), ["1", "2", "3"]);
    assert_eq!(taken(&batches), vec![vec![1, 2], vec![3]]);
}

// 3.
#[tokio::test]
async fn duplicates_take_no_batch_slot() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).max_batch_size(3).build().unwrap();
    let keys = ["a", "b", "a", "a", "a", "b", "c"];
    let results = futures_util::future::join_all(keys.map(|k| loader.load(k))).await;
    let values: Vec<String> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(values, keys.map(String::from));
    assert_eq!(taken(&batches), vec![vec!["a", "b", "c"]]);
}

// 4.
#[tokio::test]
async fn a_primed_key_resolves_without_a_batch() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    assert!(loader.prime("a", "primed".to_owned()));
    let (a, b) = tokio::join!(loader.load("a"), loader.load("b"));
    assert_eq!(a.unwrap().as_deref(), Some("primed"));
    assert_eq!(b.unwrap().as_deref(), Some("b"));
    assert_eq!(taken(&batches), vec![vec!["b"]]);
}

// 5.
#[tokio::test]
async fn repeated_keys_are_requested_once_and_cached_across_turns() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    let (a1, a2) = tokio::join!(loader.load("A"), loader.load("A"));
    assert_eq!(a1.unwrap(), a2.unwrap());
    assert_eq!(taken(&batches), vec![vec!["A"]]);

    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    let (a, b) = tokio::join!(loader.load("A"), loader.load("B"));
    assert!(a.is_ok() && b.is_ok());
    let (a, c) = tokio::join!(loader.load("A"), loader.load("C"));
    assert_eq!(a.unwrap().as_deref(), Some("A"));
    assert_eq!(c.unwrap().as_deref(), Some("C"));
    assert_eq!(taken(&batches), vec![vec!["A", "B"], vec!["C"]]);
}

// 6.
#[tokio::test]
async fn clear_and_clear_all_make_keys_fetch_again() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    let _ = tokio::join!(loader.load("A"), loader.load("B"));
    loader.clear(&"A");
    let _ = tokio::join!(loader.load("A"), loader.load("B"));
    loader.clear_all();
    let _ = tokio::join!(loader.load("A"), loader.load("B"));
    assert_eq!(
        taken(&batches),
        vec![vec!["A", "B"], vec!["A"], vec!["A", "B"]]
    );
}

// 7.
#[tokio::test]
async fn prime_keeps_an_existing_entry_unless_cleared_first() {
    let (echo, _) = Echo::new();
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    assert_eq!(loader.load("A").await.unwrap().as_deref(), Some("A"));
    assert!(!loader.prime("A", "X".to_owned()));
    assert_eq!(loader.load("A").await.unwrap().as_deref(), Some("A"));
    loader.clear(&"A");
    assert!(loader.prime("A", "X".to_owned()));
    assert_eq!(loader.load("A").await.unwrap().as_deref(), Some("X"));
}

// 8.
#[tokio::test]
async fn load_many_returns_every_value_and_nothing_for_nothing() {
    let (echo, batches) = Echo::new();
    let loader = loader(echo);
    let many = loader.load_many([1, 2]).await;
    assert_eq!(
        many.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![Some("1".to_owned()), Some("2".to_owned())]
    );
    let none = loader.load_many(Vec::<i32>::new()).await;
    assert!(none.is_empty());
    assert_eq!(
        taken(&batches),
        vec![vec![1, 2]],
        "an empty load_many makes no batch"
    );
}

/// Fails odd keys one by one: the per-key error lives in the value.
struct PerKey;

impl BatchFn<u32, Result<u32, String>> for PerKey {
    type Error = Boom;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, Result<u32, String>>, Boom> {
        Ok(keys
            .iter()
            .map(|&k| {
                (
                    k,
                    if k % 2 == 1 {
                        Err(format!("odd {k}"))
                    } else {
                        Ok(k * 10)
                    },
                )
            })
            .collect())
    }
}

// 9.
#[tokio::test]
async fn an_error_for_one_key_fails_only_that_key() {
    let loader = Loader::new(PerKey);
    let (one, two) = tokio::join!(loader.load(1), loader.load(2));
    assert_eq!(one.unwrap(), Some(Err("odd 1".to_owned())));
    assert_eq!(two.unwrap(), Some(Ok(20)));
    assert_eq!(
        loader.load(4).await.unwrap(),
        Some(Ok(40)),
        "later loads work"
    );
}

// 10.
#[tokio::test]
async fn a_failing_batch_fails_every_load_with_the_same_error() {
    let (mut echo, _) = Echo::new();
    echo.fail_on = Some(2);
    let loader = loader(echo);
    let (a, b) = tokio::join!(loader.load(1), loader.load(2));
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    let (a, b) = (a.batch_error().unwrap(), b.batch_error().unwrap());
    assert!(Arc::ptr_eq(a, b), "one Arc<E> shared by the batch");
    assert_eq!(**a, Boom("no 2".into()));
}

// 11.
#[tokio::test]
async fn errors_are_not_cached() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let echo = Echo {
        batches: batches.clone(),
        fail_on: Some(1),
    };
    let loader = Loader::builder(echo).cache(100).build().unwrap();
    assert!(loader.load(1).await.is_err());
    assert!(loader.load(1).await.is_err());
    assert_eq!(
        taken(&batches),
        vec![vec![1], vec![1]],
        "the failed key is fetched again"
    );
}

// 12.
#[tokio::test]
async fn max_batch_size_one_turns_batching_off() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).max_batch_size(1).build().unwrap();
    let _ = tokio::join!(loader.load(1), loader.load(2), loader.load(3));
    assert_eq!(taken(&batches), vec![vec![1], vec![2], vec![3]]);
}

// 13.
#[tokio::test]
async fn without_cache_keys_dedupe_within_a_batch_and_refetch_later() {
    let (echo, batches) = Echo::new();
    let loader = loader(echo);
    let _ = tokio::join!(loader.load("A"), loader.load("A"), loader.load("B"));
    let _ = tokio::join!(loader.load("A"), loader.load("B"));
    assert_eq!(taken(&batches), vec![vec!["A", "B"], vec!["A", "B"]]);
}

// 14.
#[tokio::test]
async fn loads_from_nested_async_steps_join_one_batch() {
    let (echo, batches) = Echo::new();
    let loader = loader(echo);
    async fn nested(loader: &Loader<i32, String, Echo<i32>>, key: i32) -> String {
        async fn step() {}
        step().await;
        async { step().await }.await;
        loader.load(key).await.unwrap().unwrap()
    }
    let (a, b, c) = tokio::join!(
        nested(&loader, 1),
        async { nested(&loader, 2).await },
        loader.load(3)
    );
    assert_eq!(
        (a.as_str(), b.as_str(), c.unwrap().unwrap().as_str()),
        ("1", "2", "3")
    );
    assert_eq!(taken(&batches), vec![vec![1, 2, 3]]);
}

/// A batch function that loads through another loader.
struct Outer {
    inner: Loader<i32, String, Echo<i32>>,
}

impl BatchFn<i32, String> for Outer {
    type Error = Boom;
    async fn load(&self, keys: &[i32]) -> Result<HashMap<i32, String>, Boom> {
        let inner = self.inner.load_many(keys.iter().map(|k| k * 100)).await;
        keys.iter()
            .zip(inner)
            .map(|(k, found)| {
                let found = found.map_err(|e| Boom(e.to_string()))?.unwrap_or_default();
                Ok((*k, format!("outer({found})")))
            })
            .collect()
    }
}

// 15.
#[tokio::test]
async fn a_batch_function_may_use_another_loader() {
    let (echo, inner_batches) = Echo::new();
    let outer = Loader::new(Outer {
        inner: Loader::new(echo),
    });
    let (a, b) = tokio::join!(outer.load(1), outer.load(2));
    assert_eq!(a.unwrap().as_deref(), Some("outer(100)"));
    assert_eq!(b.unwrap().as_deref(), Some("outer(200)"));
    assert_eq!(taken(&inner_batches), vec![vec![100, 200]]);
}

/// Returns every key asked for, and some nobody asked for.
struct Generous;

impl BatchFn<i32, i32> for Generous {
    type Error = Boom;
    async fn load(&self, keys: &[i32]) -> Result<HashMap<i32, i32>, Boom> {
        Ok(keys.iter().chain(&[999, 1000]).map(|k| (*k, *k)).collect())
    }
}

// 16.
#[tokio::test]
async fn keys_nobody_asked_for_are_ignored() {
    let loader = Loader::builder(Generous).cache(10).build().unwrap();
    assert_eq!(loader.load(1).await.unwrap(), Some(1));
    assert!(!loader.prime(1, 5), "the asked-for key is cached");
    assert!(loader.prime(999, 5), "the extra key was not");
}

// Missing keys: `None` by default, an error by policy.
struct Nothing;

impl BatchFn<i32, i32> for Nothing {
    type Error = Boom;
    async fn load(&self, _: &[i32]) -> Result<HashMap<i32, i32>, Boom> {
        Ok(HashMap::new())
    }
}

#[tokio::test]
async fn missing_keys_are_none_or_not_found_by_policy() {
    assert_eq!(Loader::new(Nothing).load(1).await.unwrap(), None);
    let strict = Loader::builder(Nothing)
        .missing(brisk_batch::MissingKey::Error)
        .build()
        .unwrap();
    assert!(matches!(strict.load(1).await, Err(LoadError::NotFound)));
    let many = strict.load_many([1, 2]).await;
    assert!(many.iter().all(|r| matches!(r, Err(LoadError::NotFound))));
}
