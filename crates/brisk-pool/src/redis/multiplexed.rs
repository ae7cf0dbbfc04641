use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{RedactedUrl, RedisSource, SourceError};

/// A set of multiplexed, self-reconnecting connections, handed out round-robin. Cloning is
/// cheap and clones share the set. See the [module docs](super).
#[derive(Clone)]
pub struct Multiplexed {
    connections: Arc<[ConnectionManager]>,
    next: Arc<AtomicUsize>,
    url: RedactedUrl,
}

impl std::fmt::Debug for Multiplexed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multiplexed")
            .field("url", &self.url)
            .field("connections", &self.connections.len())
            .finish()
    }
}

/// Settings for [`Multiplexed`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MultiplexedBuilder {
    url: String,
    connections: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl MultiplexedBuilder {
    /// How many multiplexed connections to open. Default 1: one connection pipelines every
    /// concurrent command already; more help only when its single socket is the bottleneck.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// The longest a (re)connection may take. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest a command may wait for its reply. Default 1 s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Opens the connections.
    ///
    /// # Errors
    /// [`SourceError::Connect`] if the URL is invalid, a setting is zero, or the server cannot
    /// be reached.
    pub async fn connect(self) -> Result<Multiplexed, SourceError> {
        let url = RedactedUrl::new(&self.url);
        let invalid = |why: &'static str| SourceError::Connect {
            url: url.clone(),
            source: redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, why)),
        };
        if self.connections == 0 {
            return Err(invalid("connections must be at least 1"));
        }
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(invalid("timeouts must be positive"));
        }
        let fail = |source| SourceError::Connect {
            url: url.clone(),
            source,
        };
        let client = redis::Client::open(self.url.as_str()).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let mut connections = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let manager = client
                .get_connection_manager_with_config(config.clone())
                .await
                .map_err(fail)?;
            connections.push(manager);
        }
        Ok(Multiplexed {
            connections: connections.into(),
            next: Arc::default(),
            url,
        })
    }
}

impl Multiplexed {
    /// One multiplexed connection to `url` (`redis://`, `rediss://` or `redis+unix://`) with the
    /// default timeouts.
    ///
    /// # Errors
    /// As [`MultiplexedBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, SourceError> {
        Self::builder(url).connect().await
    }

    /// Starts a builder for `url`.
    pub fn builder(url: &str) -> MultiplexedBuilder {
        MultiplexedBuilder {
            url: url.to_owned(),
            connections: 1,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        }
    }

    /// The server's URL, without credentials.
    #[must_use]
    pub fn url(&self) -> &RedactedUrl {
        &self.url
    }
}

impl RedisSource for Multiplexed {
    type Connection = ConnectionManager;

    async fn connection(&self) -> Result<ConnectionManager, SourceError> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        Ok(self.connections[at].clone())
    }
}
