//! N+1 queries, and the `Loader` that removes them.
//!
//! Lists 100 posts with their authors twice: naively (one query for the posts, then one per
//! post for its author: 101 queries) and through a `brisk::batch::Loader` (one query for the
//! posts, one for all their authors: 2 queries), printing the queries issued and the time each
//! took.
//!
//! ```sh
//! cargo run --example dataloader --features batch                      # SQLite file in a temp dir
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --example dataloader --features batch
//! ```
//!
//! What it creates: two *temporary* tables, `brisk_example_authors` and `brisk_example_posts`,
//! private to its own connection and dropped by the database when it disconnects. It never
//! drops, alters or reads a table it did not create, so any `DATABASE_URL` is safe to give it.

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use brisk::batch::{BatchFn, Loader};

/// Errors the example passes around; the loader shares one per failed batch.
pub type DbError = Box<dyn Error + Send + Sync>;

/// A blog post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// Primary key.
    pub id: i64,
    /// Title.
    pub title: String,
    /// The author's id: the key the listing loads by.
    pub author_id: i64,
}

/// A post's author.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    /// Primary key.
    pub id: i64,
    /// Display name.
    pub name: String,
}

#[derive(Debug)]
enum Db {
    Postgres(tokio_postgres::Client),
    // rusqlite is synchronous; queries on a local file take microseconds, so the example runs
    // them inline. A real service would use a pool and `spawn_blocking`.
    Sqlite(Mutex<rusqlite::Connection>),
}

/// The database, counting every query it runs.
#[derive(Debug)]
pub struct Store {
    db: Db,
    queries: AtomicUsize,
}

impl Store {
    /// Connects to PostgreSQL at `url`, or opens an SQLite file at `sqlite_path`.
    pub async fn connect(
        url: Option<&str>,
        sqlite_path: &std::path::Path,
    ) -> Result<Self, DbError> {
        let db = match url {
            Some(url) => {
                let (client, connection) =
                    tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Db::Postgres(client)
            }
            None => Db::Sqlite(Mutex::new(rusqlite::Connection::open(sqlite_path)?)),
        };
        Ok(Self {
            db,
            queries: AtomicUsize::new(0),
        })
    }

    /// Creates `authors` authors and `posts` posts in two temporary tables of this connection
    /// (once per connection: a second call fails, it replaces nothing).
    pub async fn seed(&self, authors: i64, posts: i64) -> Result<(), DbError> {
        let mut script = String::from(
            "CREATE TEMPORARY TABLE brisk_example_authors (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
             CREATE TEMPORARY TABLE brisk_example_posts (id BIGINT PRIMARY KEY, title TEXT NOT NULL, author_id BIGINT NOT NULL);",
        );
        for id in 1..=authors {
            script.push_str(&format!(
                "INSERT INTO brisk_example_authors VALUES ({id}, 'author {id}');"
            ));
        }
        for id in 1..=posts {
            let author = (id * 7) % authors + 1;
            script.push_str(&format!(
                "INSERT INTO brisk_example_posts VALUES ({id}, 'post {id}', {author});"
            ));
        }
        match &self.db {
            Db::Postgres(client) => client.batch_execute(&script).await?,
            Db::Sqlite(conn) => conn.lock().expect("sqlite lock").execute_batch(&script)?,
        }
        Ok(())
    }

    /// Queries run since the last reset.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// Starts counting again from zero.
    pub fn reset(&self) {
        self.queries.store(0, Ordering::SeqCst);
    }

    /// The first `limit` posts: one query.
    pub async fn posts(&self, limit: i64) -> Result<Vec<Post>, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let sql = "SELECT id, title, author_id FROM brisk_example_posts ORDER BY id LIMIT $1";
        match &self.db {
            Db::Postgres(client) => Ok(client
                .query(sql, &[&limit])
                .await?
                .iter()
                .map(|row| Post {
                    id: row.get(0),
                    title: row.get(1),
                    author_id: row.get(2),
                })
                .collect()),
            Db::Sqlite(conn) => {
                let conn = conn.lock().expect("sqlite lock");
                let mut stmt = conn.prepare(&sql.replace("$1", "?1"))?;
                let rows = stmt.query_map([limit], |row| {
                    Ok(Post {
                        id: row.get(0)?,
                        title: row.get(1)?,
                        author_id: row.get(2)?,
                    })
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
        }
    }

    /// The authors with these ids: one query, however many ids.
    pub async fn authors(&self, ids: &[i64]) -> Result<HashMap<i64, Author>, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let authors: Vec<Author> = match &self.db {
            Db::Postgres(client) => client
                .query(
                    "SELECT id, name FROM brisk_example_authors WHERE id = ANY($1)",
                    &[&ids],
                )
                .await?
                .iter()
                .map(|row| Author {
                    id: row.get(0),
                    name: row.get(1),
                })
                .collect(),
            Db::Sqlite(conn) => {
                let conn = conn.lock().expect("sqlite lock");
                let marks = vec!["?"; ids.len()].join(",");
                let mut stmt = conn.prepare(&format!(
                    "SELECT id, name FROM brisk_example_authors WHERE id IN ({marks})"
                ))?;
                let rows = stmt.query_map(rusqlite::params_from_iter(ids), |row| {
                    Ok(Author {
                        id: row.get(0)?,
                        name: row.get(1)?,
                    })
                })?;
                rows.collect::<Result<_, _>>()?
            }
        };
        Ok(authors
            .into_iter()
            .map(|author| (author.id, author))
            .collect())
    }
}

/// The batch function: every author id asked for in one moment, in one query.
#[derive(Debug)]
pub struct AuthorsById(pub Arc<Store>);

impl BatchFn<i64, Author> for AuthorsById {
    type Error = DbError;

    async fn load(&self, ids: &[i64]) -> Result<HashMap<i64, Author>, DbError> {
        self.0.authors(ids).await
    }
}

/// The N+1 way: the posts, then each post's author on its own.
pub async fn naive(store: &Store, limit: i64) -> Result<Vec<(Post, Option<Author>)>, DbError> {
    let mut out = Vec::new();
    for post in store.posts(limit).await? {
        let author = store
            .authors(&[post.author_id])
            .await?
            .remove(&post.author_id);
        out.push((post, author));
    }
    Ok(out)
}

/// The same listing through a loader: the author loads of all posts become one query.
pub async fn batched(
    store: &Arc<Store>,
    limit: i64,
) -> Result<Vec<(Post, Option<Author>)>, DbError> {
    // A loader per request: its cache (if turned on) could never serve stale data across requests.
    let authors = Loader::builder(AuthorsById(Arc::clone(store)))
        .name("authors")
        .build()
        .expect("valid loader settings");
    let posts = store.posts(limit).await?;
    // Written as one resolver per post, as a GraphQL or REST handler would be.
    let resolve = posts.into_iter().map(|post| {
        let authors = &authors;
        async move {
            // A failed batch reaches every waiter as one shared error; report it as text here.
            let author = authors
                .load(post.author_id)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, DbError>((post, author))
        }
    });
    futures_util::future::try_join_all(resolve).await
}

#[tokio::main]
#[allow(clippy::print_stdout)] // an example talks to its reader
#[allow(dead_code)] // the test that includes this file does not call main
async fn main() -> Result<(), DbError> {
    let dir = tempfile::tempdir()?;
    let url = std::env::var("DATABASE_URL").ok();
    let store = Arc::new(Store::connect(url.as_deref(), &dir.path().join("blog.sqlite")).await?);
    println!(
        "database: {}",
        if url.is_some() {
            "PostgreSQL (DATABASE_URL)"
        } else {
            "SQLite (temp file)"
        }
    );
    store.seed(20, 100).await?;

    store.reset();
    let start = Instant::now();
    let listed = naive(&store, 100).await?;
    println!(
        "naive:   {} posts, {:>3} queries, {:?}",
        listed.len(),
        store.queries(),
        start.elapsed()
    );

    store.reset();
    let start = Instant::now();
    let listed = batched(&store, 100).await?;
    println!(
        "batched: {} posts, {:>3} queries, {:?}",
        listed.len(),
        store.queries(),
        start.elapsed()
    );
    Ok(())
}
