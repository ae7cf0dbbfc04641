//! Tower layers that protect a service: a timeout that carries the request's deadline, GCRA
//! rate limiting over a local or Redis store, and load shedding with an adaptive limit.
//!
//! | layer | what it does |
//! |---|---|
//! | [`TimeoutLayer`](timeout::TimeoutLayer) | bounds each request, reads a budget header, opens the [`deadline`](brisk_core::deadline) scope that brisk's cache, loader and pool honour |
//! | [`RateLimitLayer`](ratelimit::RateLimitLayer) | quotas per key (client IP, API key, route, any closure) in tiers, local or shared through Redis |
//! | [`ConcurrencyLimitLayer`](shed::ConcurrencyLimitLayer) | sheds requests past a concurrency limit and a small queue; the limit can adapt to latency |
//!
//! Every layer admits in `call`, not `poll_ready`, and clones share their state. A refusal is
//! the service's error ([`Errors`], tower's convention) or, with the `http` feature and
//! `HttpResponses`, a response (429, 504, 503), which keeps axum's `Infallible`.
//!
//! | feature | what it brings |
//! |---|---|
//! | `http` | `HttpResponses`, budget headers (`timeout::BudgetHeader`), the `ClientIp`, `Header` and `Route` keys |
//! | `redis` | `RateLimiterBuilder::redis`: one limit shared by every replica |
//!
//! The guide, with choosing keys behind proxies, deadline budgets and rolling out in shadow
//! mode, is `docs/guard.md`.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod error;
#[cfg(feature = "http")]
pub mod http;
pub mod ratelimit;
mod respond;
pub mod shed;
pub mod timeout;

pub use self::error::{BuildError, Overloaded, RateLimited, Refusal, TimedOut, TimeoutCause};
#[cfg(feature = "http")]
pub use self::http::HttpResponses;
pub use self::respond::{Errors, Respond};

/// The error of a layer that refuses with [`Errors`], as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
