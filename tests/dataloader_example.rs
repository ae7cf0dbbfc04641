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
async fn loader_turns_101_queries_into_2_on_postgres_and_leaves_the_users_tables_alone() {
    let pg = Postgres::start().unwrap();
    // The user's own tables, with the names an earlier version of the example dropped.
    let (user, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    user.batch_execute(
        "CREATE TABLE posts (id BIGINT PRIMARY KEY, body TEXT);
         CREATE TABLE authors (id BIGINT PRIMARY KEY, email TEXT);
         INSERT INTO posts VALUES (1, 'mine'); INSERT INTO authors VALUES (1, 'me@example.com');",
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(Some(&pg.url()), &dir.path().join("unused"))
        .await
        .unwrap();
    check(Arc::new(store)).await;

    let mine: String = user
        .query_one("SELECT body FROM posts WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mine, "mine");
    let tables: i64 = user
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'brisk_example_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tables, 0,
        "the example's tables are private to its connection"
    );
}

#[tokio::test]
async fn loader_turns_101_queries_into_2_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(None, &dir.path().join("blog.sqlite"))
        .await
        .unwrap();
    check(Arc::new(store)).await;
}
