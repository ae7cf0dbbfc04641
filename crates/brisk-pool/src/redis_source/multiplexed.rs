use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use brisk_metrics::catalog::REDIS_RECONNECTS;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection, SendError};
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisFuture,
    RedisResult, Value,
};

use super::{RedactedUrl, RedisSource, SourceError};
use crate::{BuildError, MAX_WAIT};

/// The first pause between reconnection attempts; it doubles up to [`RECONNECT_MAX_PAUSE`].
/// The most sockets one `Multiplexed` opens (each pipelines every concurrent command).
const MAX_CONNECTIONS: usize = 1_024;
/// TCP keepalive on every Redis socket: probes after this long idle ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... and then this far apart, until the kernel gives the connection up.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(25);
const RECONNECT_MAX_PAUSE: Duration = Duration::from_millis(500);
/// Commands in a row that time out before the connection is taken for broken and replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

/// A set of multiplexed, self-reconnecting connections, handed out round-robin. Cloning is
/// cheap and clones share the set. See the [module docs](super).
///
/// Each connection pipelines every concurrent command over one socket. When a command finds the
/// socket broken (the server was killed, restarted, or the network cut it), that command fails
/// at once and one background task reconnects, trying again with pauses from 25 ms doubling to
/// 500 ms until it succeeds or the last clone is dropped; commands meanwhile fail fast rather
/// than wait, so a cache can fall back to its loader.
///
/// A command that times out may only have met a slow server, so one timeout does not
/// reconnect; but a peer that is silently gone (a black-holed host, a failover behind the same
/// address) never breaks the socket, and would fail every command at the response timeout for
/// minutes. So three commands in a row that time out on one connection (with no reply between
/// them) also start a reconnection. On Linux the TCP user timeout is set as well (twice the
/// response timeout, at least 1 s): the kernel then drops a connection whose sent data stays
/// unacknowledged that long.
#[derive(Clone)]
pub struct Multiplexed {
    slots: Arc<[Arc<Slot>]>,
    next: Arc<AtomicUsize>,
    url: RedactedUrl,
}

impl std::fmt::Debug for Multiplexed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multiplexed")
            .field("url", &self.url)
            .field("connections", &self.slots.len())
            .finish()
    }
}

/// One multiplexed connection and what it takes to replace it.
struct Slot {
    /// Read on every command without a shared write (unlike a lock's reader count, which two
    /// cores would pass back and forth), replaced only on reconnection.
    current: ArcSwap<Current>,
    reconnecting: AtomicBool,
    /// Commands in a row that timed out on the current connection.
    timeouts: AtomicU32,
    reconnects: brisk_metrics::Counter,
    dialer: Dialer,
    url: RedactedUrl,
}

/// What it takes to open one connection: the first, and each that replaces a lost one.
#[derive(Clone)]
struct Dialer {
    client: redis::Client,
    config: AsyncConnectionConfig,
    pushes: Option<Arc<Pushes>>,
    setup: Option<Setup>,
    /// The longest the setup may take: the response timeout.
    setup_within: Duration,
}

/// The user's setup, run on every new connection before any command is sent on it.
type Setup =
    Arc<dyn Fn(MultiplexedConnection) -> BoxFuture<'static, RedisResult<()>> + Send + Sync>;

impl Dialer {
    /// Opens the connection that will be `generation` and runs the setup on it.
    async fn open(&self, generation: u64) -> RedisResult<MultiplexedConnection> {
        let config = match &self.pushes {
            Some(pushes) => self.config.clone().set_push_sender(Pushed {
                pushes: Arc::clone(pushes),
                generation,
            }),
            None => self.config.clone(),
        };
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        if let Some(setup) = &self.setup {
            // User code: a panic or a hang fails this connection, not the caller or the
            // reconnection task.
            let run = std::panic::AssertUnwindSafe(setup(connection.clone())).catch_unwind();
            match tokio::time::timeout(self.setup_within, run).await {
                Ok(Ok(done)) => done?,
                Ok(Err(_)) => return Err(setup_failed("the on_connect setup panicked")),
                Err(_) => return Err(setup_failed("the on_connect setup timed out")),
            }
        }
        Ok(connection)
    }
}

fn setup_failed(why: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, why))
}

/// The user's push sender, shared by the connections of one slot.
struct Pushes {
    sender: Arc<dyn AsyncPushSender>,
    /// The generation of the connection in use: a connection already replaced pushes nothing
    /// more (not even its `Disconnection`, which would say the current one was lost).
    current: AtomicU64,
    slot: OnceLock<Weak<Slot>>,
}

/// The push sender of one connection: forwards its pushes unless it was replaced, and
/// reconnects as soon as it is lost, since a connection that only listens sends no command
/// that would find it broken.
struct Pushed {
    pushes: Arc<Pushes>,
    generation: u64,
}

impl AsyncPushSender for Pushed {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        // A newer generation is one still being set up: its pushes (the replies to its
        // SUBSCRIBE, say) are already the current connection's.
        if self.generation < self.pushes.current.load(Ordering::Acquire) {
            return Ok(());
        }
        let lost = info.kind == PushKind::Disconnection;
        let sent = self.pushes.sender.send(info);
        if lost && let Some(slot) = self.pushes.slot.get().and_then(Weak::upgrade) {
            slot.reconnect(self.generation);
        }
        sent
    }
}

struct Current {
    connection: MultiplexedConnection,
    /// Bumped by each reconnection, so a failure seen on an old connection does not replace a
    /// new one.
    generation: u64,
}

impl Slot {
    fn connection(self: &Arc<Self>) -> Connection {
        let current = self.current.load();
        Connection {
            inner: current.connection.clone(),
            generation: current.generation,
            slot: Arc::clone(self),
        }
    }

    /// Starts one background reconnection unless one runs already or the connection that failed
    /// was replaced meanwhile.
    fn reconnect(self: &Arc<Self>, failed: u64) {
        let replaced = || self.current.load().generation != failed;
        if replaced() || self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Checked again now that this call owns the flag: a reconnection may have finished
        // between the first check and the swap.
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !replaced() => runtime,
            // Replaced meanwhile, or not on a runtime (the next failure, on one, tries again).
            _ => {
                self.reconnecting.store(false, Ordering::Release);
                return;
            }
        };
        tracing::warn!(url = %self.url, "Redis connection lost; reconnecting");
        self.reconnects.increment(1);
        // The guard that clears the flag is made here and moved into the task, so that a task
        // dropped before its first poll (its runtime shutting down) clears it as well.
        let running = Reconnecting(Arc::downgrade(self));
        runtime.spawn(Self::reconnect_until_done(running));
    }

    async fn reconnect_until_done(running: Reconnecting) {
        let slot = running.0.clone();
        let mut pause = RECONNECT_FIRST_PAUSE;
        loop {
            // Stop once every `Multiplexed` clone and connection is gone.
            let Some(slot) = slot.upgrade() else { return };
            let generation = slot.current.load().generation + 1;
            match slot.dialer.open(generation).await {
                Ok(connection) => {
                    slot.current.store(Arc::new(Current {
                        connection,
                        generation,
                    }));
                    if let Some(pushes) = &slot.dialer.pushes {
                        pushes.current.store(generation, Ordering::Release);
                    }
                    tracing::info!(url = %slot.url, "Redis connection restored");
                    return;
                }
                Err(err) => {
                    tracing::debug!(url = %slot.url, error = %err, "Redis reconnection failed");
                }
            }
            drop(slot);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RECONNECT_MAX_PAUSE);
        }
    }
}

/// Clears `reconnecting` however the reconnection task ends — done, or dropped with the runtime
/// it ran on, even before it first ran — so that a later failure, on another runtime, can
/// start another.
struct Reconnecting(Weak<Slot>);

impl Drop for Reconnecting {
    fn drop(&mut self) {
        if let Some(slot) = self.0.upgrade() {
            slot.reconnecting.store(false, Ordering::Release);
        }
    }
}

/// A handle on one of a [`Multiplexed`] set's connections: run commands and pipelines on it with
/// `query_async`. A command that finds the socket broken starts the reconnection.
pub struct Connection {
    inner: MultiplexedConnection,
    generation: u64,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.slot.url)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn seen<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        let timeouts = &self.slot.timeouts;
        match &result {
            // A read, not a write, per reply: the count is written only after a timeout.
            Ok(_) => {
                if timeouts.load(Ordering::Relaxed) != 0 {
                    timeouts.store(0, Ordering::Relaxed);
                }
            }
            Err(err) if err.is_unrecoverable_error() => self.slot.reconnect(self.generation),
            Err(err) if err.is_timeout() => {
                if timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_BEFORE_RECONNECT {
                    timeouts.store(0, Ordering::Relaxed);
                    self.slot.reconnect(self.generation);
                }
            }
            Err(_) => {}
        }
        result
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        // One allocation, as redis-rs's own multiplexed connection makes.
        Box::pin(async move {
            let result = self.inner.send_packed_command(cmd).await;
            self.seen(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .inner
                .send_packed_commands(pipeline, offset, count)
                .await;
            self.seen(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Settings for [`Multiplexed`]. Its `Debug` shows the URL redacted.
#[derive(Clone)]
#[must_use]
pub struct MultiplexedBuilder {
    url: String,
    connections: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    pushes: Option<Arc<dyn AsyncPushSender>>,
    setup: Option<Setup>,
    #[cfg(feature = "tls")]
    tls: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for MultiplexedBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiplexedBuilder")
            .field("url", &RedactedUrl::new(&self.url))
            .field("connections", &self.connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("pushes", &self.pushes.is_some())
            .field("setup", &self.setup.is_some())
            .finish_non_exhaustive()
    }
}

impl MultiplexedBuilder {
    /// How many multiplexed connections to open. Default 1: one connection pipelines every
    /// concurrent command already; more help only when its single socket is the bottleneck.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// The longest a (re)connection may take. Default 1 s; at most
    /// [`MAX_WAIT`](crate::MAX_WAIT).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest a command may wait for its reply. Default 1 s; at most
    /// [`MAX_WAIT`](crate::MAX_WAIT).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Speak RESP3 and hand every push the server sends (pub/sub messages, client-side caching
    /// invalidations) to `sender`, which must not block. Each lost connection sends a
    /// [`PushKind::Disconnection`] and is replaced at once, without waiting for a command to
    /// find it broken; pushes of a connection already replaced are dropped. What the server
    /// knew of the old connection (subscriptions, tracking) is gone: re-establish it in
    /// [`on_connect`](Self::on_connect).
    pub fn push_sender(mut self, sender: impl AsyncPushSender) -> Self {
        self.pushes = Some(Arc::new(sender));
        self
    }

    /// Runs `setup` on every new connection before it is handed out: the first (an error fails
    /// [`connect`](Self::connect)) and each that replaces a lost one (an error drops it and
    /// tries again after the usual pause). A setup that panics or takes longer than the
    /// response timeout fails the same way. Use it for per-connection state the server forgets
    /// on a reconnect, such as `SUBSCRIBE` or `CLIENT TRACKING`.
    ///
    /// ```no_run
    /// use brisk_pool::redis_source::Multiplexed;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let listener = Multiplexed::builder("redis://127.0.0.1:6379")
    ///     .push_sender(tx)
    ///     .on_connect(|mut connection| async move { connection.subscribe("news").await })
    ///     .connect()
    ///     .await?;
    /// while let Some(push) = rx.recv().await {
    ///     println!("{:?}: {:?}", push.kind, push.data);
    /// }
    /// # drop(listener);
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_connect<F, Fut>(mut self, setup: F) -> Self
    where
        F: Fn(MultiplexedConnection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RedisResult<()>> + Send + 'static,
    {
        self.setup = Some(Arc::new(move |connection| Box::pin(setup(connection))));
        self
    }

    /// Trust this CA certificate (PEM) for a `rediss://` server instead of the system's roots:
    /// the usual case for a private CA.
    #[cfg(feature = "tls")]
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.get_or_insert_with(no_certificates).root_cert = Some(pem.into());
        self
    }

    /// Authenticate to a `rediss://` server that asks for client certificates (mutual TLS) with
    /// this certificate and private key (both PEM).
    #[cfg(feature = "tls")]
    pub fn client_certificate(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.tls.get_or_insert_with(no_certificates).client_tls = Some(redis::ClientTlsConfig {
            client_cert: cert.into(),
            client_key: key.into(),
        });
        self
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        use redis::IntoConnectionInfo;
        if is_tls(&self.url) {
            #[cfg(not(feature = "tls"))]
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "rediss:// and valkeys:// URLs need brisk-pool's `tls` feature",
            )));
            #[cfg(feature = "tls")]
            install_crypto_provider();
        }
        let info = self.url.as_str().into_connection_info()?;
        // A silently dead peer: keepalive probes after 30 s idle, every 10 s, so an idle
        // connection to a host that vanished is noticed; busy ones by the user timeout (Linux).
        let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        let tcp = info.tcp_settings().clone().set_keepalive(keepalive);
        #[cfg(target_os = "linux")]
        let tcp = tcp.set_user_timeout((self.response_timeout * 2).max(Duration::from_secs(1)));
        let mut info = info.set_tcp_settings(tcp);
        if self.pushes.is_some() {
            let settings = info.redis_settings().clone();
            info = info.set_redis_settings(settings.set_protocol(ProtocolVersion::RESP3));
        }
        #[cfg(feature = "tls")]
        if let Some(certificates) = &self.tls {
            return redis::Client::build_with_tls(info, certificates.clone());
        }
        redis::Client::open(info)
    }

    /// Opens the connections.
    ///
    /// # Errors
    /// [`SourceError::Build`] for zero connections or more than 1,024, or a timeout of zero or above
    /// [`MAX_WAIT`](crate::MAX_WAIT); [`SourceError::Connect`] if the URL is invalid or the
    /// server cannot be reached.
    pub async fn connect(self) -> Result<Multiplexed, SourceError> {
        let url = RedactedUrl::new(&self.url);
        if self.connections == 0 {
            return Err(SourceError::Build(BuildError::invalid(
                "connections",
                "must be at least 1",
            )));
        }
        if self.connections > MAX_CONNECTIONS {
            return Err(SourceError::Build(BuildError::invalid(
                "connections",
                "must be at most 1,024 (one socket pipelines every concurrent command)",
            )));
        }
        BuildError::check("connect_timeout", self.connect_timeout, MAX_WAIT)?;
        BuildError::check("response_timeout", self.response_timeout, MAX_WAIT)?;
        let fail = |source| SourceError::Connect {
            url: url.clone(),
            source,
        };
        let client = self.client().map_err(fail)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let reconnects =
            REDIS_RECONNECTS.counter(vec![metrics::Label::new("server", url.server())]);
        let mut slots = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let dialer = Dialer {
                client: client.clone(),
                config: config.clone(),
                pushes: self.pushes.as_ref().map(|sender| {
                    Arc::new(Pushes {
                        sender: Arc::clone(sender),
                        current: AtomicU64::new(0),
                        slot: OnceLock::new(),
                    })
                }),
                setup: self.setup.clone(),
                setup_within: self.response_timeout,
            };
            // The first connection is not retried: a wrong URL or an unreachable server is
            // reported now, within the connect timeout.
            let connection = dialer.open(0).await.map_err(fail)?;
            let slot = Arc::new(Slot {
                current: ArcSwap::from_pointee(Current {
                    connection,
                    generation: 0,
                }),
                reconnecting: AtomicBool::new(false),
                timeouts: AtomicU32::new(0),
                reconnects: reconnects.clone(),
                dialer,
                url: url.clone(),
            });
            if let Some(pushes) = &slot.dialer.pushes {
                let _ = pushes.slot.set(Arc::downgrade(&slot));
            }
            slots.push(slot);
        }
        Ok(Multiplexed {
            slots: slots.into(),
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
            pushes: None,
            setup: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// The server's URL, without credentials.
    #[must_use]
    pub fn url(&self) -> &RedactedUrl {
        &self.url
    }
}

impl RedisSource for Multiplexed {
    type Connection = Connection;

    async fn connection(&self) -> Result<Connection, SourceError> {
        let slot = match &*self.slots {
            [only] => only,
            // Round-robin costs a shared write per command: only when there is a choice.
            slots => &slots[self.next.fetch_add(1, Ordering::Relaxed) % slots.len()],
        };
        Ok(slot.connection())
    }
}

/// Whether `url` asks for TLS: `rediss://` or `valkeys://`, in any letter case (URL schemes
/// are case-insensitive, and redis-rs reads them so).
fn is_tls(url: &str) -> bool {
    // As the URL parser, ignore leading spaces and control characters.
    let url = url.trim_start_matches(|c: char| c <= ' ');
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
}

#[cfg(feature = "tls")]
fn no_certificates() -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: None,
    }
}

/// rustls needs a process-wide crypto provider. It picks one by itself only when exactly one is
/// compiled in; an application whose other dependencies bring a second (aws-lc-rs, say) would
/// panic on its first TLS connection. Install ring unless the application chose already.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one meanwhile: that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_schemes_in_any_case() {
        for url in [
            "rediss://h",
            "REDISS://h",
            "valkeys://h",
            "Valkeys://:pw@h:6380",
            " rediss://h",
        ] {
            assert!(super::is_tls(url), "{url}");
        }
        for url in [
            "redis://h",
            "valkey://h",
            "redis+unix:///s",
            "not a url",
            "h/rediss://",
        ] {
            assert!(!super::is_tls(url), "{url}");
        }
    }
}
