//! The dataloader example fixes N+1 on a real database: 101 queries naively, 2 with a loader.
#![cfg(feature = "batch")]

#[path = "../examples/dataloader.rs"]
#[allow(dead_code, unreachable_pub)]
mod example;

use std::sync::Arc;

use brisk_testkit::Postgres;
use example::{Store, batched, naive};

async fn check(store: Arc<Store>) {
    store.seed(20, 100).await.unwrap();

    store.reset();
    let slow = naive(&store, 100).await.unwrap();
    assert_eq!(
        store.queries(),
        101,
        "one query for the posts and one per post"
    );

    store.reset();
    let fast = batched(&store, 100).await.unwrap();
    assert_eq!(
        store.queries(),
        2,
        "one query for the posts and one for all their authors"
    );

    assert_eq!(fast.len(), 100);
    assert_eq!(fast, slow, "the same listing either way");
    assert!(fast.iter().all(|(_, author)| author.is_some()));
}

#[tokio::test]
async fn loader_turns_101_queries_into_2_on_postgres() {
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(Some(&pg.url()), &dir.path().join("unused"))
        .await
        .unwrap();
    check(Arc::new(store)).await;
}

#[tokio::test]
async fn loader_turns_101_queries_into_2_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(None, &dir.path().join("blog.sqlite"))
        .await
        .unwrap();
    check(Arc::new(store)).await;
}
