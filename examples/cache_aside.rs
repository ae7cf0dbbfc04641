//! Cache-aside in front of a slow query, with a local tier, fail-safe stale values and the
//! metrics that show what happened.
//!
//! ```sh
//! cargo run --example cache_aside --features cache                                   # no Redis needed
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example cache_aside --features cache  # on Redis
//! ```
//!
//! Besides `brisk` (feature `cache`) it uses `tokio` (`macros`, `rt-multi-thread`, `time`) and
//! `serde` (`derive`), as a service would.
//!
//! Without `REDIS_URL` the remote tier is brisk's in-memory stand-in. With it, the example
//! writes only keys under `{brisk:brisk-example-cache-aside:` (its own cache name), each for at
//! most a minute, and removes them before it exits; it reads and changes nothing else.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brisk::cache::{Cache, LocalTier};
use brisk::pool::redis_source::Multiplexed;
use serde::{Deserialize, Serialize};

/// What the slow query returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Product {
    /// Primary key.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Price in cents.
    pub price_cents: u64,
}

/// Stands in for a database: every query takes 50 ms and is counted; it can be switched off.
#[derive(Debug, Clone, Default)]
pub struct Database {
    queries: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Database {
    /// `SELECT … FROM products WHERE id = $1`.
    pub async fn product(&self, id: u64) -> Result<Option<Product>, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("connection refused"));
        }
        Ok((id < 1_000).then(|| Product {
            id,
            name: format!("product {id}"),
            price_cents: 100 + id,
        }))
    }
}

#[tokio::main]
#[allow(clippy::print_stdout)] // an example talks to its reader
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let db = Database::default();
    let mut builder = Cache::<u64, Product>::builder("brisk-example-cache-aside")
        .ttl(Duration::from_secs(2))
        .stale_for(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(20))
        .local(LocalTier::entries(10_000).ttl(Duration::from_secs(1)));
    if let Ok(url) = std::env::var("REDIS_URL") {
        builder = builder.redis(Multiplexed::connect(&url).await?);
        println!("remote tier: Redis");
    } else {
        println!("remote tier: in memory (set REDIS_URL to use Redis)");
    }
    let products = builder.build()?;

    // 1. A miss runs the query; 100 concurrent callers of the same key share that one query.
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (products, db) = (products.clone(), db.clone());
        calls.spawn(async move {
            products
                .get_or_load(&7, async move { db.product(7).await })
                .await
        });
    }
    let mut ok = 0;
    while let Some(answer) = calls.join_next().await {
        ok += usize::from(matches!(answer?, Ok(Some(_))));
    }
    println!(
        "100 concurrent misses: {ok} answered in {:?}, {} query",
        started.elapsed(),
        db.queries.load(Ordering::SeqCst)
    );

    // 2. A hit: no query.
    let started = Instant::now();
    let hit = products
        .get_or_load(&7, {
            let db = db.clone();
            async move { db.product(7).await }
        })
        .await?;
    println!(
        "hit: {:?} in {:?}, still {} query",
        hit.map(|p| p.name),
        started.elapsed(),
        db.queries.load(Ordering::SeqCst)
    );

    // 3. "None" is cached too: a product that does not exist costs one query, not one per call.
    let before = db.queries.load(Ordering::SeqCst);
    for _ in 0..3 {
        let db = db.clone();
        assert!(
            products
                .get_or_load(&5_000, async move { db.product(5_000).await })
                .await?
                .is_none()
        );
    }
    println!(
        "3 lookups of a missing product: {} query",
        db.queries.load(Ordering::SeqCst) - before
    );

    // 4. The database goes down after the TTL passed: the stale value is served (fail-safe).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    db.down.store(true, Ordering::SeqCst);
    let served = products
        .get_or_load(&7, {
            let db = db.clone();
            async move { db.product(7).await }
        })
        .await?;
    println!(
        "database down, TTL passed: served {:?} (stale)",
        served.map(|p| p.name)
    );

    // Leave nothing behind.
    products.invalidate(&7).await?;
    products.invalidate(&5_000).await?;
    Ok(())
}
