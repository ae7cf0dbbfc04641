//! Batching for brisk: a DataLoader that turns the N+1 queries of a handler into one, and (with
//! the `tower` feature) a layer that batches single requests into calls of a bulk service.
//!
//! ```
//! use std::collections::HashMap;
//! use brisk_batch::{BatchFn, Loader};
//!
//! struct Authors;
//!
//! impl BatchFn<u64, String> for Authors {
//!     type Error = std::io::Error;
//!     async fn load(&self, ids: &[u64]) -> Result<HashMap<u64, String>, Self::Error> {
//!         // One query for every id asked for in this moment:
//!         // SELECT id, name FROM authors WHERE id = ANY($1)
//!         Ok(ids.iter().map(|id| (*id, format!("author {id}"))).collect())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), brisk_batch::LoadError<std::io::Error>> {
//! let authors = Loader::builder(Authors).name("authors").build().expect("valid settings");
//! // Three concurrent loads, one batch: [1, 2].
//! let (a, b, c) = tokio::join!(authors.load(1), authors.load(2), authors.load(1));
//! assert_eq!(a?.as_deref(), Some("author 1"));
//! assert_eq!(b?.as_deref(), Some("author 2"));
//! assert_eq!(c?, Some("author 1".to_owned()));
//! # Ok(())
//! # }
//! ```
//!
//! # How loads become batches
//!
//! A batch collects keys until one of these, whichever comes first:
//! - it holds `max_batch_size` keys (a hard cap: a larger `load_many` is split);
//! - its window closes: by default when the tasks that were ready have had one turn (no fixed
//!   delay), or after [`LoaderBuilder::window`] if set;
//! - a waiter's deadline (`brisk_core::deadline`) is nearer than the window;
//! - [`Loader::flush`] is called.
//!
//! Each batch runs on its own tokio task (so a load needs a tokio runtime, else
//! [`LoadError::NoRuntime`]). At most `max_concurrent_batches` batches run at once (default 10),
//! so a burst cannot drain the database pool; at most `max_queued_batches` wait for a slot, past
//! which loads fail with [`LoadError::Overloaded`]. A batch requested from inside a batch function
//! (a recursive loader, see [`LoaderBuilder::build_cyclic`], or one loader loading from another)
//! takes no slot, so recursion deeper than the limit still completes; and such a load never joins
//! a batch that waits on its requester (a cycle), but is loaded again in a batch of its own. For
//! loads on tasks a batch function spawns, wrap the spawned future in [`within_batch`].
//!
//! Keys are deduplicated within a batch and against batches in flight, with or without the
//! cache. The cache ([`LoaderBuilder::cache`]) is off by default and bounded when on.
//! [`Loader::clear`], [`Loader::clear_all`] and [`Loader::prime`] win over batches already
//! running: a load after a clear is fetched by a batch that has not started yet, and a running
//! batch never overwrites a primed value or writes back a cleared one.
//!
//! # Failure
//!
//! - A batch error reaches every waiter of that batch as the same `Arc<E>`; `E` need not be
//!   `Clone`. Errors are never cached.
//! - For per-key errors, make the value a `Result` (`Loader<K, Result<T, E2>, F>`): the batch
//!   succeeds and each key carries its own outcome. [`Loader::load_many`] gives one result per
//!   key, in the order asked.
//! - User code is contained: a panic in the batch function (also before it returns its future),
//!   or in a key's `Hash`/`Eq`/`Clone` or a value's `Clone` while results are handed out, fails
//!   the loads it touches with [`LoadError::Panicked`]; the loader keeps working.
//! - A batch runs on its own task, under no caller's task-locals: no caller's deadline bounds it,
//!   and a waiter whose deadline passes gets [`LoadError::Deadline`] while the others are
//!   unaffected. Dropping any caller at any point neither stalls nor fails the others; when the
//!   last caller of a batch goes, the batch is cancelled (or finished, see [`Abandoned`]).
//!
//! # Metrics
//!
//! Per loader (label `loader`): `brisk_batch_batches_total`, `brisk_batch_size`,
//! `brisk_batch_singleton_batches_total` (when most batches have one key, the N+1 problem is
//! back), `brisk_batch_keys_total{kind=requested|deduplicated|cached|missing}`,
//! `brisk_batch_queue_wait_seconds`, `brisk_batch_duration_seconds` and
//! `brisk_batch_failures_total{reason}`. A loader built before the application installs its
//! recorder reports to it all the same. Each dispatch runs in a `brisk.batch.dispatch` span.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod batch_fn;
mod cache;
mod engine;
mod error;
#[cfg(feature = "tower")]
pub mod layer;
mod loader;
mod metrics;

pub use batch_fn::BatchFn;
pub use engine::{Abandoned, within_batch};
pub use error::{BuildError, LoadError, Setting};
pub use loader::{Load, LoadMany, Loader, LoaderBuilder, MissingKey, WeakLoader};
