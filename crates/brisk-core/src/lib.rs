//! Shared foundations of brisk: deadline propagation.
//!
//! A request's remaining time budget travels with the task that serves it. The guard's timeout
//! layer (or your own code) opens a [`deadline::scope`]; every brisk operation that waits — a
//! remote cache call, a pool checkout, a loader wait — waits at most
//! `min(its own timeout, deadline::remaining())` through [`deadline::bounded`], and fails with a
//! typed [`deadline::Elapsed`] instead of hanging.
//!
//! ```
//! use std::time::Duration;
//! use brisk_core::deadline;
//! use tokio::time::Instant;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let budget = Instant::now() + Duration::from_millis(50);
//! let answer = deadline::scope(budget, async {
//!     // Deep inside the request: the budget is visible without being passed around.
//!     assert!(deadline::remaining().unwrap() <= Duration::from_millis(50));
//!     deadline::bounded(Duration::from_secs(1), async { 42 }).await
//! })
//! .await;
//! assert_eq!(answer.unwrap(), 42);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod deadline;
