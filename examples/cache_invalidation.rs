//! Two instances of one cache, each with a local tier, staying coherent: a write on one drops
//! the other's local copy within milliseconds, tags and `clear` reach both.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example cache_invalidation --features cache
//! INVALIDATION=tracking REDIS_URL=redis://127.0.0.1:6379 cargo run --example cache_invalidation --features cache
//! ```
//!
//! Besides `brisk` (feature `cache`) it uses `tokio` (`macros`, `rt-multi-thread`, `time`) and
//! `serde` (`derive`), as a service would. It needs a Redis server (6 or later; `REDIS_URL`,
//! default `redis://127.0.0.1:6379`). In a service the two instances would be two processes;
//! here they are two caches on their own connections, which is the same to Redis.
//!
//! It writes only keys under `{brisk:brisk-example-invalidation:` (its own cache name), each
//! for at most a minute, and removes its entries before it exits; it reads and changes nothing
//! else.

use std::error::Error;
use std::time::{Duration, Instant};

use brisk::cache::{Cache, Invalidation, LocalTier};
use brisk::pool::redis_source::Multiplexed;
use serde::{Deserialize, Serialize};

/// A row of the products table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Its name.
    pub name: String,
    /// Price in cents.
    pub price_cents: u64,
    /// Which category it is listed in.
    pub category: String,
}

fn product(name: &str, price_cents: u64, category: &str) -> Product {
    Product {
        name: name.to_owned(),
        price_cents,
        category: category.to_owned(),
    }
}

/// One instance of the products cache, as each process of the service builds it.
async fn instance(
    url: &str,
    tracking: bool,
) -> Result<Cache<u64, Product>, Box<dyn Error + Send + Sync>> {
    let listening = Multiplexed::builder(url);
    let invalidation = if tracking {
        // Redis tells of every write to the cache's keys, brisk's or anyone's.
        Invalidation::tracking(listening)
    } else {
        // Instances tell each other what they wrote (works on a cluster too).
        Invalidation::backplane(listening)
    };
    let cache = Cache::builder("brisk-example-invalidation")
        .ttl(Duration::from_secs(60))
        .redis(Multiplexed::connect(url).await?)
        // Kept locally as long as the remote entry: invalidation keeps it right.
        .local(LocalTier::entries(10_000))
        .invalidation(invalidation)
        .tags(|_id: &u64, product: Option<&Product>| {
            product
                .map(|p| vec![format!("category:{}", p.category)])
                .unwrap_or_default()
        })
        .build()?;
    // Until its connection is set up, the local tier is bypassed; wait for it to show it.
    let until = Instant::now() + Duration::from_secs(5);
    while !cache.is_listening() {
        if Instant::now() > until {
            return Err("the invalidation connection was not set up within 5 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(cache)
}

/// Waits until `check` holds (at most a second) and says how long it took.
async fn how_long(
    mut check: impl AsyncFnMut() -> bool,
) -> Result<Duration, Box<dyn Error + Send + Sync>> {
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > Duration::from_secs(1) {
            return Err("not within a second".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started.elapsed())
}

#[tokio::main]
#[allow(clippy::print_stdout)] // an example talks to its reader
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let tracking = std::env::var("INVALIDATION").is_ok_and(|mode| mode == "tracking");
    println!(
        "invalidation by {}",
        if tracking {
            "Redis's client tracking"
        } else {
            "the backplane"
        }
    );
    let a = instance(&url, tracking).await?;
    let b = instance(&url, tracking).await?;

    // 1. b reads product 1; it keeps it in its local tier.
    a.set(&1, product("Rust in Action", 3_999, "books")).await?;
    a.set(&2, product("The Rust Book", 2_999, "books")).await?;
    a.set(&3, product("Ferris plush", 1_499, "toys")).await?;
    for id in 1..=3 {
        b.get(&id).await?;
    }

    // 2. a changes the price: b's local copy goes, and b reads the new price.
    a.set(&1, product("Rust in Action", 2_499, "books")).await?;
    let took = how_long(async || {
        b.get(&1)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.price_cents == 2_499)
    })
    .await?;
    println!("b sees a's new price after {took:?}");

    // 3. Drop every book at once, from b: a misses both books, keeps the toy.
    b.invalidate_tag("category:books").await?;
    let took = how_long(async || {
        a.get(&1).await.ok().flatten().is_none() && a.get(&2).await.ok().flatten().is_none()
    })
    .await?;
    println!(
        "a misses the books {took:?} after b invalidated the tag; the toy is still there: {}",
        a.get(&3).await?.is_some()
    );

    // 4. Clear the whole cache.
    a.clear().await?;
    let took = how_long(async || b.get(&3).await.ok().flatten().is_none()).await?;
    println!("b misses everything {took:?} after a's clear");

    // Remove what the example stored (the tag and clear times expire by themselves).
    for id in 1..=3 {
        a.invalidate(&id).await?;
    }
    Ok(())
}
