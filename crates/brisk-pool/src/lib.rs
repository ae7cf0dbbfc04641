//! Pooling for brisk: one [`Pool`] trait over deadpool and bb8, and [`Instrumented`], which
//! bounds every wait, measures every checkout and explains every timeout.
//!
//! ```no_run
//! # async fn run(pool: deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use brisk_pool::Instrumented;
//!
//! // Keep the pool you have; wrap it once.
//! let pool = Instrumented::builder(pool)
//!     .name("main")
//!     .wait_timeout(Duration::from_millis(500))
//!     .build()?;
//! let client = pool.get().await?; // at most 500 ms, or less if the request's deadline is nearer
//! client.query_one("SELECT 1", &[]).await?;
//! # Ok(())
//! # }
//! ```
//!
//! A checkout that times out is a [`PoolError::Exhausted`] whose [`Exhausted`] diagnosis names
//! the connections in use and the maximum, the callers waiting, how long the oldest connection
//! has been out, and the last error opening one — the difference between "the pool is too
//! small", "the database is down" and "someone never returns a connection".
//!
//! Metrics (label `db_client_connection_pool_name`): `db_client_connection_wait_time_seconds`,
//! `db_client_connection_use_time_seconds`, `db_client_connection_timeouts_total`,
//! `db_client_connection_count{db_client_connection_state=idle|used}`,
//! `db_client_connection_max`, `db_client_connection_pending_requests` and
//! `brisk_pool_checkout_errors_total{reason}`, and `brisk_pool_nested_checkouts_total`: a task
//! that already holds a connection and asks the same pool for another (how pools deadlock) is
//! counted, and logged as a warning in debug builds.
//!
//! "Holds" is what can be told honestly: a checkout may move to another task (into
//! `tokio::spawn`, a channel) and nothing sees a move happen. So a checkout made by a task
//! that took a connection not yet returned is counted only once that first connection comes
//! back *from the same task*: then the task held it throughout. One handed to another task and
//! returned there is not counted, since it may have moved before the second checkout (one
//! moved and then brought back is counted). The count therefore shows up when the first
//! connection is returned, not at the second checkout; in a deadlock that is when a wait
//! timeout ends it.
//!
//! Lifecycle, the same over both backends: [`Instrumented::warm_up`] opens connections before
//! the first request needs them; a [`Lifecycle`] closes connections past their (jittered)
//! lifetime or idle too long and keeps `min_idle` open — applied by
//! [`Instrumented::spawn_lifecycle`] over deadpool, by bb8 itself through [`Lifecycle::bb8`];
//! and [`Instrumented::close`] stops new checkouts and waits (bounded) for the ones out.
//!
//! `brisk_pool_recommended_size` suggests a size from the measured demand: by Little's law the
//! average number of callers holding or waiting for a connection is the time they spent doing
//! so divided by the window; the gauge is 1.5 times that. `docs/pooling.md` explains it.
//!
//! With the `redis` feature, [`redis_source::RedisSource`] is how brisk-cache and brisk-guard
//! reach Redis: a set of multiplexed connections, any instrumented Redis pool, or a cluster
//! connection. (The module is not named `redis`, which would shadow the `redis` crate.)
//!
//! Wrap the manager in [`Measured`] to time every connection the pool opens and remember the
//! last failure, even over bb8, which keeps it to itself.
//!
//! # Design decisions, and why
//!
//! - **A connection whose operation was cut off is closed, not returned.** The server may still
//!   be running the query a deadline dropped; the next caller would queue behind it. A
//!   [`Checkout`] dropped after the request's deadline, during a panic, or with a Redis command
//!   through it unfinished is taken out of the pool ([`Pool::discard`]), and
//!   [`Checkout::discard`] does it on demand. So over deadpool the connection handed out is
//!   deadpool's `Object` (the one thing that can be taken out), and over bb8 discarding needs a
//!   [`Measured`] manager (bb8 drops a connection only when its manager calls it broken).
//! - **A database that is down is not hammered.** After a failed connection attempt, checkouts
//!   that would open one fail fast with [`PoolError::Unavailable`] for a jittered, doubling
//!   pause ([`InstrumentedBuilder::connect_backoff`]); one checkout per pause tries again.
//! - **No wait is unbounded**: every timeout is checked at build against [`MAX_WAIT`]
//!   (`Duration::MAX` would arm no timer at all), and [`BuildError`] names the setting.
//! - **Warm-up is not a request**: it opens only what is missing, never waits for a connection
//!   in use, yields to waiting callers and stays out of the checkout metrics. It never keeps an
//!   idle connection while a connect of its own is pending: over bb8 it opens connections into
//!   the pool ([`Pool::open_idle`]); over deadpool, which opens connections only for checkouts,
//!   it checks out the idle ones together with the new ones and gives each back as soon as it
//!   has it, so a connect that hangs starves no caller.
//! - **Idle time runs from a connection's return** ([`IdleSince`]), not from its last
//!   checkout as deadpool counts it.
//! - **Errors name what fired**: the pool's wait timeout, the request's deadline, the backend
//!   (with its causes' text), the backoff or `close`.
//!
//! | feature | default | what it brings |
//! |---|---|---|
//! | `deadpool` | yes | [`Pool`] for `deadpool::managed::Pool` |
//! | `bb8` | yes | [`Pool`] for `bb8::Pool` |
//! | `redis` | no | [`redis_source::RedisSource`] and [`redis_source::Multiplexed`] |
//! | `tls` | no | `rediss://` for [`redis_source::Multiplexed`] (rustls with ring) |
//! | `serde` | no | [`Lifecycle`] from configuration |
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod backoff;
mod clock;
mod error;
mod holders;
mod instrumented;
mod lifecycle;
mod measured;
mod pool;
#[cfg(feature = "redis")]
pub mod redis_source;
mod stripes;

pub use error::{
    BackendError, BuildError, CloseTimeout, Exhausted, MAX_PERIOD, MAX_WAIT, PoolError, Unavailable,
};
pub use instrumented::{Checkout, Instrumented, InstrumentedBuilder};
pub use lifecycle::{IdleSince, Lifecycle};
pub use measured::{Creations, Measured};
pub use pool::{GetError, Pool, Status};

/// The deadpool this crate is built against (0.13), so that naming a pool type needs no
/// dependency of your own.
#[cfg(feature = "deadpool")]
pub use deadpool;

/// The bb8 this crate is built against (0.9), so that naming a pool type needs no dependency
/// of your own.
#[cfg(feature = "bb8")]
pub use bb8;
