//! The connections brisk-cache and brisk-guard run Redis commands through.
//!
//! ```no_run
//! use brisk_pool::redis::{Multiplexed, RedisSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = Multiplexed::connect("redis://:secret@127.0.0.1:6379").await?;
//! let mut conn = redis.connection().await?;
//! let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut conn).await?;
//! // The password never shows: `redis://:***@127.0.0.1:6379`.
//! println!("{redis:?}");
//! # Ok(())
//! # }
//! ```
//!
//! A [`RedisSource`] hands out something that speaks redis-rs's
//! [`ConnectionLike`], so callers run any command or pipeline with
//! `query_async`. Three kinds of source:
//! - [`Multiplexed`]: multiplexed connections that reconnect by themselves, handed out
//!   round-robin. The default: no checkout, no pool to size.
//! - any pool wrapped in [`Instrumented`] whose connection dereferences to
//!   one (deadpool-redis and bb8-redis pools): checkouts are bounded, measured and diagnosed.
//! - a Redis Cluster connection (`redis::cluster_async::ClusterConnection`), which routes each
//!   key to its slot's master.
//!
//! URLs may carry credentials; this module shows them only as [`RedactedUrl`].

mod multiplexed;

use std::fmt;
use std::future::Future;

use std::ops::{Deref, DerefMut};

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::{Checkout, Instrumented, Pool};

pub use self::multiplexed::{Connection, Multiplexed, MultiplexedBuilder};

/// Hands out connections to run Redis commands on.
pub trait RedisSource: Send + Sync + 'static {
    /// What commands run on: a multiplexed connection's clone, or a pool checkout.
    type Connection: ConnectionLike + Send;

    /// A connection, ready for `query_async`.
    fn connection(&self) -> impl Future<Output = Result<Self::Connection, SourceError>> + Send;
}

/// A source could not provide a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Connecting to the server failed.
    #[error("could not connect to {url}")]
    Connect {
        /// Where, without credentials.
        url: RedactedUrl,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
    /// A pool gave no connection (its error says why: exhausted, closed, or the backend).
    #[error("the pool gave no connection")]
    Checkout(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A URL with its password (and username) replaced by `***`, safe for logs, errors and metric
/// labels.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    /// Redacts the user information of `url` (`scheme://user:password@host` → `scheme://***:***@host`).
    #[must_use]
    pub fn new(url: &str) -> Self {
        match split_credentials(url) {
            Some((scheme, user, server)) => {
                let masked = match user.split_once(':') {
                    Some(("", _)) => ":***",
                    Some(_) => "***:***",
                    None => "***",
                };
                Self(format!("{scheme}://{masked}@{server}"))
            }
            None => Self(url.to_owned()),
        }
    }

    /// The URL with no user information at all (`rediss://host:6380/0`): what metric labels
    /// carry.
    #[must_use]
    pub fn server(&self) -> String {
        match split_credentials(&self.0) {
            Some((scheme, _, server)) => format!("{scheme}://{server}"),
            None => self.0.clone(),
        }
    }

    /// The redacted text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `scheme://user@server` → `(scheme, user, server)`; `None` without user information.
/// Credentials end at the last '@' before the path.
fn split_credentials(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A checkout of a pool of Redis connections (deadpool-redis, bb8-redis) runs commands on the
/// connection it holds. A command or pipeline dropped before its reply came (a timeout, a
/// deadline) leaves the checkout marked: it is closed rather than returned to the pool, since
/// the server may still be running it (a `BLPOP`, a slow script) ahead of the next caller's.
impl<P> ConnectionLike for Checkout<P>
where
    P: Pool,
    P::Connection: DerefMut,
    <P::Connection as Deref>::Target: ConnectionLike,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let cut_off = self.cut_off;
        self.cut_off = true;
        Box::pin(async move {
            let result = (**self).deref_mut().req_packed_command(cmd).await;
            self.cut_off = cut_off;
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let cut_off = self.cut_off;
        self.cut_off = true;
        Box::pin(async move {
            let result = (**self)
                .deref_mut()
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.cut_off = cut_off;
            result
        })
    }

    fn get_db(&self) -> i64 {
        (**self).deref().get_db()
    }
}

/// A pool of Redis connections, wrapped in [`Instrumented`], is a source whose checkouts are
/// bounded, measured and diagnosed.
impl<P> RedisSource for Instrumented<P>
where
    P: Pool,
    P::Connection: DerefMut,
    <P::Connection as Deref>::Target: ConnectionLike,
{
    type Connection = Checkout<P>;

    async fn connection(&self) -> Result<Checkout<P>, SourceError> {
        self.get()
            .await
            .map_err(|err| SourceError::Checkout(Box::new(err)))
    }
}

impl RedisSource for redis::cluster_async::ClusterConnection {
    type Connection = Self;

    async fn connection(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::RedactedUrl;

    #[test]
    fn credentials_never_survive() {
        for (url, shown) in [
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://user:secret@host:6379", "redis://***:***@host:6379"),
            ("rediss://token@host", "rediss://***@host"),
            ("redis://host:6379", "redis://host:6379"),
            (
                "redis+unix:///tmp/redis.sock",
                "redis+unix:///tmp/redis.sock",
            ),
            ("redis://us@r:p@ss@host/1", "redis://***:***@host/1"),
            ("not a url", "not a url"),
        ] {
            let redacted = RedactedUrl::new(url);
            assert_eq!(redacted.as_str(), shown);
            assert!(!format!("{redacted} {redacted:?}").contains("secret"));
            assert!(!redacted.server().contains("***"), "{}", redacted.server());
            assert!(!redacted.server().contains("secret"));
        }
    }
}
