//! Keeping the local tiers of a cache's instances coherent: a backplane (pub/sub) or Redis's
//! server-assisted client-side caching (`CLIENT TRACKING`), over one listening connection per
//! cache.
//!
//! The rule that makes both safe: the local tier serves only while the cache hears every
//! change. Until its connection is set up, and from the moment it is lost until a new one is
//! set up again, nothing is kept locally (reads go to Redis), and every set-up and every loss
//! empties the local tier. A read that began before an invalidation (or a flush) never fills
//! the local tier after it (the write epochs of `cache.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use brisk_metrics::catalog::{CACHE_INVALIDATIONS, CACHE_LISTENING};
use brisk_metrics::{Counter, Gauge};
use brisk_pool::redis_source::{MultiplexedBuilder, RedisSource as _};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::remote::Core;

/// How a cache's local tier learns of writes made by other instances (and, with tracking, by
/// anyone). Give it to [`CacheBuilder::invalidation`](crate::CacheBuilder::invalidation); it
/// opens one more connection per cache, with this builder's URL and settings (its
/// `push_sender` and `on_connect` are the cache's own).
///
/// | | backplane | tracking |
/// |---|---|---|
/// | sees | writes made through brisk | every write to the cache's keys, brisk's or not |
/// | costs | one `PUBLISH` per write (pipelined, off the caller's path) | nothing per write; Redis keeps the prefix table |
/// | Redis Cluster | yes: any one node's URL (the cluster forwards every `PUBLISH` to every node) | no (it would need every primary) |
#[derive(Clone, Debug)]
pub struct Invalidation {
    pub(crate) mode: Mode,
    pub(crate) connection: MultiplexedBuilder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Backplane,
    Tracking,
}

impl Invalidation {
    /// Every write through brisk (set, invalidate, write-through, a load's store, tags and
    /// clear) is published on the channel `brisk:<name>:1:inv`, numbered per publishing
    /// instance; each instance drops what others changed from its local tier, skips its own
    /// messages, and empties its local tier when it sees a gap in a publisher's numbers.
    #[must_use]
    pub fn backplane(connection: MultiplexedBuilder) -> Self {
        Self {
            mode: Mode::Backplane,
            connection,
        }
    }

    /// `CLIENT TRACKING ON BCAST PREFIX {brisk:<name>:1:` on a RESP3 connection: Redis itself
    /// tells of every write to the cache's keys, including writes made outside brisk. Needs
    /// Redis 6 or later, and a single server (not a cluster).
    #[must_use]
    pub fn tracking(connection: MultiplexedBuilder) -> Self {
        Self {
            mode: Mode::Tracking,
            connection,
        }
    }
}

/// How often the listening connection is pinged: a connection that only listens sends nothing
/// that would find it broken, and a silent peer is noticed only by what is sent.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Pings in a row that time out before the listening connection is taken for silent; as many as
/// make brisk-pool's `Multiplexed` replace a connection.
const SILENT_AFTER: u32 = 3;
/// Pauses between attempts to open the listening connection the first time.
const FIRST_RETRY: Duration = Duration::from_millis(25);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Publishers remembered for gap detection; past this many the memory starts over (the first
/// message of a publisher is never a gap).
const MAX_PUBLISHERS: usize = 4_096;

/// What a cache does with what its listener hears.
pub(crate) trait Heard: Send + Sync + 'static {
    /// A key (its encoding, without prefix or braces) changed elsewhere: drops it, or returns
    /// `false` if the key type cannot tell which key that is.
    fn key_changed(&self, encoding: &[u8]) -> bool;
    /// Everything local, tier and known tag times, may be old.
    fn flush(&self);
}

/// The listening state of one cache, kept in the cache.
pub(crate) struct Listener {
    pub(crate) mode: Mode,
    /// Set up and not lost since: the local tier may serve.
    listening: AtomicBool,
    /// This instance, as a publisher.
    id: u64,
    next: AtomicU64,
    /// The key prefix, `{brisk:<name>:1:`.
    prefix: Vec<u8>,
    channel: String,
    /// The last number seen of each other publisher.
    publishers: Mutex<HashMap<u64, u64>>,
    /// Backplane only: what to publish, in order, by the publishing task.
    outbox: Option<mpsc::UnboundedSender<Vec<u8>>>,
    gauge: Gauge,
    by_key: Counter,
    by_tag: Counter,
    flushed: Counter,
}

impl Listener {
    /// The listener of the cache `name`, and for a backplane the receiving end of its outbox.
    pub(crate) fn new(
        mode: Mode,
        name: &str,
        prefix: Vec<u8>,
    ) -> (Self, Option<mpsc::UnboundedReceiver<Vec<u8>>>) {
        let (outbox, published) = match mode {
            Mode::Backplane => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            Mode::Tracking => (None, None),
        };
        let labels = |kind: &str| [("cache", name.to_owned()), ("kind", kind.to_owned())];
        let listener = Self {
            mode,
            listening: AtomicBool::new(false),
            id: fastrand::u64(..),
            next: AtomicU64::new(0),
            prefix,
            channel: format!("brisk:{name}:{}:inv", crate::envelope::FORMAT_VERSION),
            publishers: Mutex::default(),
            outbox,
            gauge: CACHE_LISTENING.gauge(&[("cache", name.to_owned())]),
            by_key: CACHE_INVALIDATIONS.counter(&labels("key")),
            by_tag: CACHE_INVALIDATIONS.counter(&labels("tag")),
            flushed: CACHE_INVALIDATIONS.counter(&labels("flush")),
        };
        listener.gauge.set(0.0);
        (listener, published)
    }

    /// Whether the local tier may serve and be filled now.
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Tells the other instances that these keys (Redis keys of this cache) changed. Off the
    /// caller's path: the publishing task sends messages in order, pipelined. A message lost
    /// on the way leaves a gap its receivers see at the next one.
    pub(crate) fn publish_keys<'a>(&self, rkeys: impl IntoIterator<Item = &'a [u8]>) {
        let Some(outbox) = &self.outbox else { return };
        let mut message = self.header(b'k');
        for rkey in rkeys {
            let encoding = rkey
                .strip_prefix(self.prefix.as_slice())
                .and_then(|rest| rest.strip_suffix(b"}"))
                .unwrap_or_default();
            message.extend_from_slice(format!("{}:", encoding.len()).as_bytes());
            message.extend_from_slice(encoding);
        }
        let _ = outbox.send(message);
    }

    /// Tells the other instances that a tag (or, for `clear`, the empty name) was invalidated:
    /// they forget what they knew of tags and empty their local tiers.
    pub(crate) fn publish_tag(&self, name: &str) {
        let Some(outbox) = &self.outbox else { return };
        let mut message = self.header(if name.is_empty() { b'c' } else { b't' });
        message.extend_from_slice(name.as_bytes());
        let _ = outbox.send(message);
    }

    /// `<publisher, hex>:<number>:<kind>`; the number is taken now, so messages are numbered
    /// in the order the outbox receives them.
    fn header(&self, kind: u8) -> Vec<u8> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let mut message = format!("{:016x}:{number}:", self.id).into_bytes();
        message.push(kind);
        message
    }

    fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
        self.gauge.set(if listening { 1.0 } else { 0.0 });
    }
}

/// Starts the cache's listening connection and, for a backplane, its publishing task, on the
/// current runtime; both end when the cache is dropped.
pub(crate) fn start<H: Heard>(
    listener: Arc<Listener>,
    heard: &Arc<H>,
    connection: MultiplexedBuilder,
    published: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    core: Arc<Core>,
    runtime: &tokio::runtime::Handle,
) {
    if let Some(published) = published {
        runtime.spawn(publish(published, listener.channel.clone(), core));
    }
    runtime.spawn(listen(listener, Arc::downgrade(heard), connection));
}

/// Sends what the outbox receives, every message waiting at once in one pipeline.
async fn publish(mut outbox: mpsc::UnboundedReceiver<Vec<u8>>, channel: String, core: Arc<Core>) {
    let mut messages = Vec::new();
    while outbox.recv_many(&mut messages, 256).await > 0 {
        if let Err(err) = core.publish(&channel, &messages).await {
            tracing::debug!(%channel, %err, "invalidations not published; receivers will see the gap");
        }
        messages.clear();
    }
}

/// Opens the listening connection (retrying until the cache is dropped), then pings it.
async fn listen<H: Heard>(listener: Arc<Listener>, heard: Weak<H>, connection: MultiplexedBuilder) {
    let mut pause = FIRST_RETRY;
    let listening = loop {
        if heard.strong_count() == 0 {
            return;
        }
        let (pushes, pushed) = (Arc::clone(&listener), heard.clone());
        let (setups, set_up) = (Arc::clone(&listener), heard.clone());
        let opened = connection
            .clone()
            .push_sender(move |push: PushInfo| {
                if let Some(cache) = pushed.upgrade() {
                    // Runs on the connection's task, and calls user code (the key type's
                    // `decode`, `Hash`, `Eq`): a panic there empties the local tier instead.
                    let heard = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        on_push(&pushes, &*cache, &push);
                    }));
                    if heard.is_err() {
                        empty(&pushes, &*cache);
                    }
                }
                Ok::<(), ()>(())
            })
            .on_connect(move |mut connection| {
                let (listener, heard) = (Arc::clone(&setups), set_up.clone());
                async move {
                    match listener.mode {
                        Mode::Backplane => connection.subscribe(&listener.channel).await?,
                        Mode::Tracking => {
                            redis::cmd("CLIENT")
                                .arg("TRACKING")
                                .arg("ON")
                                .arg("BCAST")
                                .arg("PREFIX")
                                .arg(&listener.prefix)
                                .query_async::<()>(&mut connection)
                                .await?;
                        }
                    }
                    // Hearing from now on: what was kept before may be old.
                    if let Some(cache) = heard.upgrade() {
                        listener.set_listening(true);
                        empty(&listener, &*cache);
                    }
                    Ok(())
                }
            })
            .connect()
            .await;
        match opened {
            Ok(listening) => break listening,
            Err(err) => {
                tracing::warn!(%err, "the cache's invalidation connection could not be opened; the local tier waits for it");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    };
    let mut timeouts = 0;
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(cache) = heard.upgrade() else { return };
        drop(cache);
        // A lost connection sends `Disconnection` (handled in `on_push`) and is replaced by
        // `Multiplexed`. A silent one (a paused or black-holed server) never does: after as
        // many pings in a row time out as make `Multiplexed` replace it, nothing it says can be
        // trusted to come, so the local tier goes deaf until the replacement is set up.
        let Ok(mut ping) = listening.connection().await else {
            continue;
        };
        match redis::cmd("PING").query_async::<Value>(&mut ping).await {
            Err(err) if err.is_timeout() => {
                timeouts += 1;
                if timeouts == SILENT_AFTER
                    && let Some(cache) = heard.upgrade()
                {
                    listener.set_listening(false);
                    empty(&listener, &*cache);
                }
            }
            Err(_) => {}
            Ok(_) => timeouts = 0,
        }
    }
}

/// Empties the cache's local tier, counted as a flush (something may have changed that this
/// instance cannot name).
fn empty<H: Heard>(listener: &Listener, cache: &H) {
    listener.flushed.increment(1);
    cache.flush();
}

/// Drops the key `encoding` names, or everything if its type cannot tell which key it is.
fn drop_key<H: Heard>(listener: &Listener, cache: &H, encoding: &[u8]) {
    listener.by_key.increment(1);
    if !cache.key_changed(encoding) {
        empty(listener, cache);
    }
}

/// What one push means for the cache.
fn on_push<H: Heard>(listener: &Listener, cache: &H, push: &PushInfo) {
    match push.kind {
        PushKind::Disconnection => {
            listener.set_listening(false);
            empty(listener, cache);
        }
        PushKind::Message => {
            if let [_, Value::BulkString(message)] = push.data.as_slice() {
                on_message(listener, cache, message);
            }
        }
        PushKind::Invalidate => match push.data.as_slice() {
            [Value::Array(keys)] => {
                for key in keys {
                    if let Value::BulkString(key) = key {
                        on_tracked(listener, cache, key);
                    }
                }
            }
            // A null: Redis flushed its tracking table (FLUSHALL, FLUSHDB).
            _ => {
                empty(listener, cache);
            }
        },
        _ => {}
    }
}

/// A key tracking says changed: an entry's (dropped), a lease's (ignored), or else unknown
/// (everything dropped).
fn on_tracked<H: Heard>(listener: &Listener, cache: &H, key: &[u8]) {
    let Some(rest) = key.strip_prefix(listener.prefix.as_slice()) else {
        return;
    };
    if rest.ends_with(b"}:lease") {
        return;
    }
    // A tag's or clear's time (`tags.rs`): what was known of tags, and kept locally, is old.
    if rest.starts_with(b"}") {
        listener.by_tag.increment(1);
        cache.flush();
        return;
    }
    match rest.strip_suffix(b"}") {
        Some(encoding) => drop_key(listener, cache, encoding),
        None => {
            empty(listener, cache);
        }
    }
}

/// A backplane message: `<publisher>:<number>:<kind><body>`.
fn on_message<H: Heard>(listener: &Listener, cache: &H, message: &[u8]) {
    let Some((publisher, number, kind, body)) = parse(message) else {
        // Not ours to read, yet on our channel: something may have changed.
        empty(listener, cache);
        return;
    };
    if publisher == listener.id {
        return;
    }
    let gap = {
        let mut publishers = listener
            .publishers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if publishers.len() >= MAX_PUBLISHERS && !publishers.contains_key(&publisher) {
            publishers.clear();
        }
        let last = publishers.insert(publisher, number);
        last.is_some_and(|last| number != last.wrapping_add(1))
    };
    if gap {
        empty(listener, cache);
        return;
    }
    match kind {
        b'k' => {
            let mut body = body;
            while !body.is_empty() {
                let Some((encoding, rest)) = length_prefixed(body) else {
                    empty(listener, cache);
                    return;
                };
                drop_key(listener, cache, encoding);
                body = rest;
            }
        }
        b't' | b'c' => {
            listener.by_tag.increment(1);
            cache.flush();
        }
        _ => {
            empty(listener, cache);
        }
    }
}

fn parse(message: &[u8]) -> Option<(u64, u64, u8, &[u8])> {
    let (publisher, rest) = split_colon(message)?;
    let (number, rest) = split_colon(rest)?;
    let publisher = u64::from_str_radix(std::str::from_utf8(publisher).ok()?, 16).ok()?;
    let number = std::str::from_utf8(number).ok()?.parse().ok()?;
    let (&kind, body) = rest.split_first()?;
    Some((publisher, number, kind, body))
}

fn split_colon(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == b':')?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// `<len>:<bytes>` off the front of `body`.
fn length_prefixed(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = split_colon(body)?;
    let len: usize = std::str::from_utf8(len).ok()?.parse().ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Whether `connection` is a fit for `mode` over a source that is (or is not) a cluster.
pub(crate) fn check(mode: Mode, cluster: bool) -> Result<(), &'static str> {
    if mode == Mode::Tracking && cluster {
        return Err(
            "tracking needs a single Redis server; over a cluster use Invalidation::backplane",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back() {
        let (listener, _outbox) =
            Listener::new(Mode::Backplane, "users", b"{brisk:users:1:".to_vec());
        let message = listener.header(b'k');
        let (publisher, number, kind, body) = parse(&message).unwrap();
        assert_eq!(
            (publisher, number, kind, body),
            (listener.id, 0, b'k', &b""[..])
        );
        assert_eq!(
            length_prefixed(b"3:i:1rest"),
            Some((&b"i:1"[..], &b"rest"[..]))
        );
        assert_eq!(length_prefixed(b"9:i:1"), None);
        assert_eq!(parse(b"zz:1:k"), None);
        assert_eq!(parse(b"01:x:k"), None);
        assert_eq!(parse(b"01:1:"), None);
    }
}
