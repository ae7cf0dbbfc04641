//! A two-tier cache: an optional in-process tier in front of Redis, with single-flight loads,
//! fail-safe stale values, and a remote tier whose failures make a request slower, never failed.
//!
//! ```
//! use std::time::Duration;
//! use brisk_cache::{Cache, LocalTier};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // No Redis given: the remote tier is an in-memory map (give one with `.redis(source)`).
//! let users: Cache<u64, String> = Cache::builder("users")
//!     .ttl(Duration::from_secs(60))
//!     .local(LocalTier::entries(10_000).ttl(Duration::from_secs(5)))
//!     .build()?;
//!
//! // Cache-aside: on a miss the future loads the value (once, however many callers miss).
//! let name = users
//!     .get_or_load(&42, async { Ok::<_, std::io::Error>(Some("Ada".to_owned())) })
//!     .await?;
//! assert_eq!(name.as_deref(), Some("Ada"));
//! // A hit: the loader is not run.
//! let again = users.get_or_load(&42, async { unreachable!() as Result<_, std::io::Error> }).await?;
//! assert_eq!(again.as_deref(), Some("Ada"));
//! # Ok(())
//! # }
//! ```
//!
//! # Strategies
//!
//! - Cache-aside: [`Cache::get_or_load`] with a future that loads the key.
//! - Read-through: register a loader with [`CacheBuilder::loader`]; [`Cache::get`] uses it.
//! - Write-through: [`Cache::write_through`] writes the source of truth first, then the cache.
//! - Direct: [`Cache::set`], [`Cache::get`] (without a loader: no load), [`Cache::invalidate`].
//! - Batched: [`Cache::get_or_load_many`] reads many keys in one round trip and loads the
//!   misses in one call.
//! - Tagged: [`CacheBuilder::tags`] tags entries; [`Cache::invalidate_tag`] and
//!   [`Cache::clear`] drop many at once.
//!
//! # The read path
//!
//! 1. The local tier, if any: a fresh entry answers at once.
//! 2. A load of the key already in progress: wait for it.
//! 3. The remote tier, within `min(remote_timeout, deadline::remaining())` and through a
//!    circuit breaker; a fresh value answers (and fills the local tier). Reads made at the same
//!    moment share one `MGET` (while the breaker is closed). Down, slow, open breaker, or bytes
//!    that are not this cache's: all a miss, counted.
//! 4. The load, on its own task: one per key in this process at a time (and over Redis, one
//!    per key across processes: it takes the key's lease, or waits for the holder's value),
//!    bounded by the hard timeout. Its value goes to every waiter and the local tier, then to
//!    Redis — only while its lease stands.
//!
//! With a stale value at hand (past its TTL, within [`stale_for`](CacheBuilder::stale_for)), a
//! load that fails, panics, times out, or passes the [`soft_timeout`](CacheBuilder::soft_timeout)
//! — or a caller deadline that comes first — serves the stale value instead.
//!
//! # Keys and values
//!
//! Keys implement [`CacheKey`] (an injective encoding; see [`key`]), values serde's traits;
//! they travel in an envelope (format version, codec, a fingerprint of the type, times) so that
//! anything foreign is a miss, never an error. `docs/caching.md` is the guide.
//!
//! # Decisions, and why
//!
//! - **MessagePack by default**, where the design handbook said JSON: measured 1.2–1.9× as fast
//!   as JSON on a 1 KiB struct, 19% smaller, and as faithful to serde attributes (tests hold
//!   both); postcard, faster still, silently cannot carry some types, so it is opt-in.
//! - **`quick_cache` for the local tier**, chosen by `cache/local_hit`: a brisk hit costs a quarter
//!   of a moka `get`. Entries sit inline in the map with their expiry, read through tokio's clock
//!   so that paused-time tests drive them.
//! - **A load answers first and writes Redis after**, on its own task: a miss waits for the
//!   loader, not for a second round trip. Callers arriving meanwhile join the finished load, and
//!   a write to the key lets that Redis write land before its own, so the write wins.
//! - **Reads never fail because of Redis**, writes say so: `set`, `invalidate` and
//!   `write_through` return [`Error::Remote`] when Redis may still hold an older value, since a
//!   caller who asked to change the cache must know when it could not.
//! - **Leases over Redis**: a load takes the key's lease first and stores its value by a
//!   compare-and-set on it, which every write and invalidation ends, so a load that began
//!   before an invalidation never stores its value after it, and processes missing one key
//!   together load it once (the others wait for its value). Their TTL is the hard timeout plus
//!   two remote timeouts: a live holder never outlives it, a dead one frees the key after it.
//!   `docs/caching.md` has the details.
//! - **Early refresh is opt-in** ([`CacheBuilder::early_refresh`], XFetch): a background
//!   reload near the expiry costs a load that a cold key would not have needed.
//! - **Local tiers serve only while they hear** ([`CacheBuilder::invalidation`]): with a
//!   backplane (pub/sub, numbered per publisher) or Redis's client tracking, an instance drops
//!   what another changed; while its listening connection is not set up, or lost, nothing is
//!   kept locally, and each set-up and each loss empties the local tier. The listening
//!   connection is brisk-pool's `Multiplexed`, which re-runs the subscription on every new
//!   connection, rather than a second reconnect loop here.
//! - **Tags by time, not by index** ([`Cache::invalidate_tag`], [`Cache::clear`]): Redis
//!   keeps when each tag was invalidated, each entry when it was made, and a read of an older
//!   entry is a miss. Invalidating is one write whatever the number of entries, and a hit stays
//!   one round trip (known times are kept in process). The price is a dependence on the
//!   instances' clocks agreeing (NTP), which `docs/caching.md` spells out.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod breaker;
mod builder;
mod cache;
mod clock;
mod codec;
mod early;
mod envelope;
mod error;
mod invalidation;
pub mod key;
mod local;
mod remote;
mod tags;

pub use breaker::BreakerConfig;
pub use builder::{CacheBuilder, MAX_TIMEOUT, MAX_TTL};
pub use cache::Cache;
pub use codec::Codec;
pub use error::{BuildError, Error, RemoteError, SharedError};
pub use invalidation::Invalidation;
pub use key::{CacheKey, KeyError};
pub use local::LocalTier;
