//! A brisk-batch `Loader` behind the cache: a cached DataLoader.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use brisk_batch::{BatchFn, Loader};
use brisk_cache::Cache;

/// Records the keys of each batch it is asked for.
#[derive(Clone, Default)]
struct Users {
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl BatchFn<u64, String> for Users {
    type Error = std::io::Error;

    async fn load(&self, ids: &[u64]) -> Result<HashMap<u64, String>, Self::Error> {
        self.batches.lock().unwrap().push(ids.to_vec());
        // Even ids exist; odd ones do not.
        Ok(ids
            .iter()
            .filter(|id| *id % 2 == 0)
            .map(|id| (*id, format!("user {id}")))
            .collect())
    }
}

#[tokio::test]
async fn misses_of_many_keys_become_one_batch_and_hits_load_nothing() {
    let users = Users::default();
    let loader = Loader::builder(users.clone())
        .name("users")
        .build()
        .unwrap();
    let cache: Cache<u64, String> = Cache::builder("users")
        .loader(move |id: u64| {
            let loader = loader.clone();
            async move { loader.load(id).await }
        })
        .build()
        .unwrap();
    let ids = [2_u64, 4, 6, 7];
    let got = futures_util::future::join_all(ids.iter().map(|id| cache.get(id))).await;
    let got: Vec<_> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        got,
        [
            Some("user 2".into()),
            Some("user 4".into()),
            Some("user 6".into()),
            None
        ]
    );
    assert_eq!(
        users.batches.lock().unwrap().len(),
        1,
        "one batch for four misses"
    );
    // All cached now, the missing one as an absence.
    let again = futures_util::future::join_all(ids.iter().map(|id| cache.get(id))).await;
    assert_eq!(again.into_iter().filter(Result::is_ok).count(), 4);
    assert_eq!(
        users.batches.lock().unwrap().len(),
        1,
        "hits and cached absences load nothing"
    );
}
