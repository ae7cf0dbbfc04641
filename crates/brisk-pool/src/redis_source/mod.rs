//! The connections brisk-cache and brisk-guard run Redis commands through.
//!
//! ```no_run
//! use brisk_pool::redis_source::{Multiplexed, RedisSource};
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
//!
//! The module is `redis_source`, not `redis`: a `use brisk_pool::redis;` would shadow the
//! `redis` crate itself in the user's file, where `redis::cmd(...)` is written next to it.

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

    /// Whether its connections route commands over a Redis Cluster, where a pipeline must
    /// keep to the keys of one node: users of a source split their pipelines by hash slot then.
    const CLUSTER: bool = false;
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
    /// A setting was refused before connecting.
    #[error(transparent)]
    Build(#[from] crate::BuildError),
    /// A pool gave no connection; match its [`PoolError`](crate::PoolError) to tell an
    /// exhausted pool from a spent deadline, a backend failure or a closed pool.
    #[error("no Redis connection from the pool: {0}")]
    Checkout(#[source] crate::PoolError<crate::BackendError>),
}

/// A URL with its credentials replaced by `***`, safe for logs, errors and metric labels.
///
/// Every place redis-rs reads credentials from is masked: the user information
/// (`redis://user:password@host`, in any scheme redis-rs accepts — `redis`, `rediss`, `valkey`,
/// `valkeys`, `redis+unix`, `valkey+unix`, `unix`, any letter case) and every query parameter
/// but `db` and `protocol` (`redis+unix:///run/redis.sock?user=app&pass=secret`: redis-rs reads
/// `user` and `pass` there; other names are masked too, in case a future version reads them).
/// A string that is not a URL is masked up to its last `@`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(String);

/// Query parameters redis-rs reads that never hold a secret.
const PLAIN_PARAMETERS: [&str; 2] = ["db", "protocol"];

impl RedactedUrl {
    /// Redacts the credentials of `url`: `scheme://user:password@host` → `scheme://***:***@host`,
    /// `?user=app&pass=secret&db=1` → `?user=***&pass=***&db=1`.
    #[must_use]
    pub fn new(url: &str) -> Self {
        let (url, fragment) = match url.split_once('#') {
            // redis-rs knows only `#insecure`; anything else is shown masked.
            Some((url, "insecure")) => (url, Some("insecure")),
            Some((url, _)) => (url, Some("***")),
            None => (url, None),
        };
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let mut redacted = match split_credentials(base) {
            Some((scheme, user, server)) => {
                let masked = match user.split_once(':') {
                    Some(("", _)) => ":***",
                    Some(_) => "***:***",
                    None => "***",
                };
                match scheme {
                    Some(scheme) => format!("{scheme}://{masked}@{server}"),
                    None => format!("***@{server}"),
                }
            }
            None => base.to_owned(),
        };
        if let Some(query) = query {
            redacted.push('?');
            let pairs = query.split('&').map(|pair| match pair.split_once('=') {
                Some((key, _)) if PLAIN_PARAMETERS.contains(&key.to_ascii_lowercase().as_str()) => {
                    pair.to_owned()
                }
                Some((key, _)) => format!("{key}=***"),
                None if pair.is_empty() => String::new(),
                None => "***".to_owned(),
            });
            redacted.push_str(&pairs.collect::<Vec<_>>().join("&"));
        }
        if let Some(fragment) = fragment {
            redacted.push('#');
            redacted.push_str(fragment);
        }
        Self(redacted)
    }

    /// The URL with no user information, query or fragment at all (`rediss://host:6380/0`,
    /// `redis+unix:///run/redis.sock`): what metric labels carry.
    #[must_use]
    pub fn server(&self) -> String {
        let base = self.0.split(['?', '#']).next().unwrap_or_default();
        match split_credentials(base) {
            Some((Some(scheme), _, server)) => format!("{scheme}://{server}"),
            Some((None, _, server)) => server.to_owned(),
            None => base.to_owned(),
        }
    }

    /// The redacted text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `scheme://user@server` → `(Some(scheme), user, server)`; `None` without user information.
/// Credentials end at the last '@' before the path. A unix socket's path may hold an '@'; any
/// other '@' past the authority (a malformed URL, which redis-rs refuses and an error then
/// shows) is taken as the end of credentials too, and so is one in a string with no `://`.
fn split_credentials(url: &str) -> Option<(Option<&str>, &str, &str)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        let at = url.rfind('@')?;
        return Some((None, &url[..at], &url[at + 1..]));
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let unix = scheme.to_ascii_lowercase().ends_with("unix");
    let at = rest[..authority_end]
        .rfind('@')
        .or_else(|| if unix { None } else { rest.rfind('@') })?;
    Some((Some(scheme), &rest[..at], &rest[at + 1..]))
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
            // A command that timed out may still be running (a `BLPOP`): its reply would come
            // to the next user of the connection.
            self.cut_off = cut_off || result.as_ref().is_err_and(redis::RedisError::is_timeout);
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
            self.cut_off = cut_off || result.as_ref().is_err_and(redis::RedisError::is_timeout);
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
            .map_err(|err| SourceError::Checkout(err.erase()))
    }
}

impl RedisSource for redis::cluster_async::ClusterConnection {
    type Connection = Self;

    const CLUSTER: bool = true;

    async fn connection(&self) -> Result<Self, SourceError> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::RedactedUrl;

    #[test]
    fn credentials_never_survive() {
        for (url, shown, server) in [
            (
                "redis://:secret@host:6379/0",
                "redis://:***@host:6379/0",
                "redis://host:6379/0",
            ),
            (
                "redis://user:secret@host:6379",
                "redis://***:***@host:6379",
                "redis://host:6379",
            ),
            ("rediss://secret@host", "rediss://***@host", "rediss://host"),
            (
                "valkey://:secret@host",
                "valkey://:***@host",
                "valkey://host",
            ),
            (
                "valkeys://u:secret@host#insecure",
                "valkeys://***:***@host#insecure",
                "valkeys://host",
            ),
            ("REDIS://:secret@HOST", "REDIS://:***@HOST", "REDIS://HOST"),
            (
                "redis://:p%40secret@host",
                "redis://:***@host",
                "redis://host",
            ),
            (
                "redis://:pa/secret@host",
                "redis://:***@host",
                "redis://host",
            ),
            (
                "redis://host:6379",
                "redis://host:6379",
                "redis://host:6379",
            ),
            (
                "redis://host/1?password=secret",
                "redis://host/1?password=***",
                "redis://host/1",
            ),
            (
                "redis://host/?protocol=resp3&secret",
                "redis://host/?protocol=resp3&***",
                "redis://host/",
            ),
            ("redis://host#secret", "redis://host#***", "redis://host"),
            (
                "redis+unix:///tmp/redis.sock",
                "redis+unix:///tmp/redis.sock",
                "redis+unix:///tmp/redis.sock",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&user=me&pass=secret",
                "redis+unix:///tmp/r.sock?db=1&user=***&pass=***",
                "redis+unix:///tmp/r.sock",
            ),
            (
                "valkey+unix:///tmp/r.sock?PASS=secret",
                "valkey+unix:///tmp/r.sock?PASS=***",
                "valkey+unix:///tmp/r.sock",
            ),
            (
                "unix:///tmp/a@b.sock?pass=secret",
                "unix:///tmp/a@b.sock?pass=***",
                "unix:///tmp/a@b.sock",
            ),
            (
                "redis://us@r:p@secret@host/1",
                "redis://***:***@host/1",
                "redis://host/1",
            ),
            ("redis//:secret@host", "***@host", "host"),
            ("not a url", "not a url", "not a url"),
        ] {
            let redacted = RedactedUrl::new(url);
            assert_eq!(redacted.as_str(), shown, "{url}");
            assert_eq!(redacted.server(), server, "{url}");
            assert!(
                !format!("{redacted} {redacted:?}").contains("secret"),
                "{url}"
            );
        }
    }
}
