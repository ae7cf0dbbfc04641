//! Every kind of `RedisSource`, against private Redis servers.
#![cfg(feature = "redis")]

use std::time::Duration;

use brisk_metrics::catalog::REDIS_RECONNECTS;
use brisk_metrics::testing::Capture;
use brisk_pool::Instrumented;
use brisk_pool::redis_source::{Multiplexed, RedisSource, SourceError};
use brisk_testkit::{RedisCluster, RedisServer};
use tokio::time::Instant;

/// SET then GET through any source.
async fn round_trip<S: RedisSource>(source: &S, key: &str) {
    let mut conn = source.connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("value")
        .query_async(&mut conn)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(got, "value");
}

#[tokio::test]
async fn multiplexed_runs_commands_over_every_connection() {
    let server = RedisServer::start().unwrap();
    let source = Multiplexed::builder(&server.url())
        .connections(3)
        .connect()
        .await
        .unwrap();
    for i in 0..6 {
        round_trip(&source, &format!("k{i}")).await;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("INCR").arg("n").cmd("INCR").arg("n");
    let counts: (i64, i64) = pipe
        .query_async(&mut source.connection().await.unwrap())
        .await
        .unwrap();
    assert_eq!(counts, (1, 2));
}

#[tokio::test]
async fn multiplexed_connects_over_a_unix_socket() {
    let server = RedisServer::builder().unix_socket().start().unwrap();
    let url = server.url();
    assert!(url.starts_with("redis+unix://"), "{url}");
    let source = Multiplexed::connect(&url).await.unwrap();
    round_trip(&source, "over-unix").await;
}

#[tokio::test]
async fn multiplexed_reconnects_after_a_restart() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let capture = Capture::new();
    let source = capture
        .scope(
            Multiplexed::builder(&server.url())
                .response_timeout(Duration::from_millis(200))
                .connect(),
        )
        .await
        .unwrap();
    let url = server.url();
    let reconnects = || capture.counter(REDIS_RECONNECTS.name, &[("server", &url)]);
    round_trip(&source, "before").await;
    assert_eq!(reconnects(), 0);
    server.kill().unwrap();
    let mut conn = source.connection().await.unwrap();
    let started = Instant::now();
    let down: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(down.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a dead server fails fast"
    );
    server.restart().unwrap();
    serving_within(&source, Duration::from_secs(2)).await;
    round_trip(&source, "after").await;
    assert!(generation(&source).await.contains("generation: 1"));
    // The connection taken before the kill still holds the dead socket: its failure must not
    // replace the new connection.
    let stale: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(stale.is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(generation(&source).await.contains("generation: 1"));
    round_trip(&source, "still").await;
    assert_eq!(reconnects(), 1, "one loss, one reconnection, counted once");
}

#[tokio::test]
async fn multiplexed_bounds_commands_to_a_paused_server() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let source = Multiplexed::builder(&server.url())
        .response_timeout(Duration::from_millis(150))
        .connect()
        .await
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let mut conn = source.connection().await.unwrap();
    let stuck: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(stuck.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    server.resume().unwrap();
    // A slow server is not a broken one: the same connection serves again, none replaced it.
    round_trip(&source, "resumed").await;
    assert!(generation(&source).await.contains("generation: 0"));
}

/// Waits until a connection from `source` answers PING again, failing the test after `limit`.
async fn serving_within(source: &Multiplexed, limit: Duration) {
    let back = Instant::now();
    loop {
        let mut conn = source.connection().await.unwrap();
        if redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
        {
            return;
        }
        assert!(back.elapsed() < limit, "not serving again within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `Debug` text of a fresh connection, which names its generation (bumped per reconnection).
async fn generation(source: &Multiplexed) -> String {
    format!("{:?}", source.connection().await.unwrap())
}

#[tokio::test]
async fn a_deadpool_redis_pool_is_a_source() {
    let server = RedisServer::start().unwrap();
    let pool = deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let source = Instrumented::builder(pool).name("redis").build().unwrap();
    round_trip(&source, "deadpool").await;
}

#[tokio::test]
async fn a_bb8_redis_pool_is_a_source() {
    let server = RedisServer::start().unwrap();
    let manager = bb8_redis::RedisConnectionManager::new(server.url()).unwrap();
    let pool = bb8::Pool::builder()
        .max_size(2)
        .build(manager)
        .await
        .unwrap();
    let source = Instrumented::builder(pool).name("redis").build().unwrap();
    round_trip(&source, "bb8").await;
}

#[tokio::test]
async fn a_cluster_connection_is_a_source() {
    let cluster = RedisCluster::start().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let source = client.get_async_connection().await.unwrap();
    for i in 0..30 {
        round_trip(&source, &format!("cluster:{i}")).await;
    }
}

#[tokio::test]
async fn credentials_never_show() {
    let server = RedisServer::builder()
        .arg("--requirepass")
        .arg("s3cret-pw")
        .start()
        .unwrap();
    let port = server.port().unwrap();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}");
    let source = Multiplexed::connect(&url).await.unwrap();
    round_trip(&source, "auth").await;
    let shown = format!("{source:?} {}", source.url());
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains(":***@127.0.0.1"), "{shown}");

    // A failed connection names the server, never the password.
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{port}");
    let err = Multiplexed::connect(&wrong).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-pw"), "{shown}");
    assert!(matches!(err, SourceError::Connect { .. }));
}

#[tokio::test]
async fn bad_settings_are_errors() {
    let err = Multiplexed::builder("redis://127.0.0.1:1")
        .connections(0)
        .connect()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("connections: must be at least 1"),
        "{err}"
    );
    let err = Multiplexed::connect("not a url").await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }));
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;

    #[tokio::test]
    async fn rediss_trusting_the_servers_ca() {
        let server = RedisServer::builder().tls().start().unwrap();
        let url = server.url();
        assert!(url.starts_with("rediss://"), "{url}");
        let ca = std::fs::read(server.ca_certificate().unwrap()).unwrap();
        let source = Multiplexed::builder(&url)
            .root_certificate(ca)
            .connect()
            .await
            .unwrap();
        round_trip(&source, "over-tls").await;
    }

    #[tokio::test]
    async fn rediss_refuses_a_server_it_does_not_trust() {
        let server = RedisServer::builder().tls().start().unwrap();
        // The test CA is not among the system's roots.
        let err = Multiplexed::connect(&server.url()).await.unwrap_err();
        assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
        let chain = format!("{err} / {:?}", std::error::Error::source(&err));
        assert!(chain.contains(&server.url()), "{chain}");
        assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    }

    #[tokio::test]
    async fn a_ca_that_is_not_pem_is_a_connect_error() {
        let server = RedisServer::builder().tls().start().unwrap();
        let err = Multiplexed::builder(&server.url())
            .root_certificate(b"not a certificate".to_vec())
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    }
}

/// A `BLPOP` cut off by a timeout keeps the server busy on that connection for 3 s: the pool of
/// one must hand out a fresh connection, not that one.
async fn a_cut_off_command_is_not_inherited<P>(source: Instrumented<P>)
where
    P: brisk_pool::Pool,
    P::Connection: std::ops::DerefMut,
    <P::Connection as std::ops::Deref>::Target: redis::aio::ConnectionLike,
{
    let cut = tokio::time::timeout(Duration::from_millis(100), async {
        let mut conn = source.connection().await.unwrap();
        redis::cmd("BLPOP")
            .arg("nothing-comes")
            .arg(3)
            .query_async::<Option<(String, String)>>(&mut conn)
            .await
    })
    .await;
    assert!(cut.is_err(), "the timeout cut the command off");
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = source.connection().await.unwrap();
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    assert!(
        matches!(next, Ok(Ok(_))),
        "the next command waited behind the cut one: {next:?}"
    );
    // Not the 500 ms of redis-rs's response timeout, after which the pool's recycling PING
    // gives up on the busy connection by itself.
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

/// A deadpool-redis pool of one connection named `redis`, instrumented with a `wait` bound.
fn deadpool_redis_of_one(
    server: &RedisServer,
    wait: Duration,
) -> Instrumented<deadpool_redis::Pool> {
    let pool = deadpool_redis::Config::from_url(server.url())
        .builder()
        .unwrap()
        .max_size(1)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .unwrap();
    Instrumented::builder(pool)
        .name("redis")
        .wait_timeout(wait)
        .build()
        .unwrap()
}

#[tokio::test]
async fn deadpool_redis_closes_a_connection_whose_command_was_cut_off() {
    let server = RedisServer::start().unwrap();
    let source = deadpool_redis_of_one(&server, Duration::from_secs(1));
    a_cut_off_command_is_not_inherited(source).await;
}

#[tokio::test]
async fn bb8_redis_closes_a_connection_whose_command_was_cut_off() {
    let server = RedisServer::start().unwrap();
    let manager = bb8_redis::RedisConnectionManager::new(server.url()).unwrap();
    let pool = bb8::Pool::builder()
        .max_size(1)
        .build(brisk_pool::Measured::new(manager, "redis"))
        .await
        .unwrap();
    let source = Instrumented::builder(pool)
        .wait_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    a_cut_off_command_is_not_inherited(source).await;
}

/// Loses the connection on a runtime that is then shut down, and checks that another runtime
/// reconnects: `let_it_run` gives the reconnection task 50 ms on the first runtime (it is cut
/// short mid-retry) or none (it is dropped before its first poll; a current-thread runtime
/// polls what it spawned only when `block_on` waits).
fn reconnects_after_its_runtime_shut_down(let_it_run: bool) {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let mut server = RedisServer::builder().private().start().unwrap();
    let first = runtime();
    let source = first
        .block_on(
            Multiplexed::builder(&server.url())
                .response_timeout(Duration::from_millis(200))
                .connect(),
        )
        .unwrap();
    server.kill().unwrap();
    first.block_on(async {
        let mut conn = source.connection().await.unwrap();
        let down: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        assert!(down.is_err());
        if let_it_run {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    drop(first);
    server.restart().unwrap();
    runtime().block_on(serving_within(&source, Duration::from_secs(2)));
}

/// A runtime shut down in the middle of a reconnection (a test's runtime, a service's
/// restarted worker pool) must not leave the connection unable to reconnect on another one.
#[test]
fn a_reconnection_cut_short_by_its_runtime_does_not_stop_the_next() {
    reconnects_after_its_runtime_shut_down(true);
}

/// Nor one whose task was dropped before it first ran.
#[test]
fn a_reconnection_dropped_before_it_ran_does_not_stop_the_next() {
    reconnects_after_its_runtime_shut_down(false);
}

/// redis-rs reads credentials from the query of a unix-socket URL (`?user=`, `?pass=`): they
/// must not show in the builder's or the source's `Debug`, in errors, nor in the `server` label
/// of the reconnection counter.
#[tokio::test]
async fn credentials_in_the_query_never_show() {
    let mut server = RedisServer::builder()
        .private()
        .unix_socket()
        .arg("--requirepass")
        .arg("s3cret-pw")
        .start()
        .unwrap();
    let socket = server.url();
    let url = format!("{socket}?user=default&pass=s3cret-pw");
    let builder = Multiplexed::builder(&url).response_timeout(Duration::from_millis(200));
    let shown = format!("{builder:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains("pass=***"), "{shown}");
    let capture = Capture::new();
    let source = capture.scope(builder.connect()).await.unwrap();
    round_trip(&source, "query-auth").await;
    let shown = format!("{source:?} {}", source.url());
    assert!(!shown.contains("s3cret-pw"), "{shown}");

    for wrong in [
        format!("{socket}?pass=wrong-pw"),
        format!("{socket}?user=default&password=wrong-pw&pass=wrong-pw"),
    ] {
        let err = Multiplexed::connect(&wrong).await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("wrong-pw"), "{shown}");
    }

    // A reconnection is counted under the socket's path alone.
    server.kill().unwrap();
    let mut conn = source.connection().await.unwrap();
    let down: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(down.is_err());
    server.restart().unwrap();
    serving_within(&source, Duration::from_secs(2)).await;
    assert_eq!(
        capture.counter(REDIS_RECONNECTS.name, &[("server", &socket)]),
        1
    );
}

#[tokio::test]
async fn timeouts_that_would_wait_forever_are_refused() {
    for builder in [
        Multiplexed::builder("redis://127.0.0.1:1").connect_timeout(Duration::MAX),
        Multiplexed::builder("redis://127.0.0.1:1").response_timeout(Duration::MAX),
        Multiplexed::builder("redis://127.0.0.1:1").response_timeout(Duration::ZERO),
    ] {
        let err = builder.connect().await.unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::Build(
                    brisk_pool::BuildError::TooLong { .. } | brisk_pool::BuildError::Zero { .. }
                )
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("_timeout"), "{err}");
    }
}

#[tokio::test]
async fn a_pool_source_error_is_matchable() {
    let server = RedisServer::start().unwrap();
    let source = deadpool_redis_of_one(&server, Duration::from_millis(50));
    let _held = source.connection().await.unwrap();
    let err = source.connection().await.unwrap_err();
    let SourceError::Checkout(brisk_pool::PoolError::Exhausted(diagnosis)) = &err else {
        panic!("expected an exhausted pool, got {err:?}")
    };
    assert_eq!((diagnosis.pool.as_str(), diagnosis.in_use), ("redis", 1));
    assert!(
        err.to_string()
            .starts_with("no Redis connection from the pool: the pool's wait timeout fired"),
        "{err}"
    );
}

/// A peer that is silently gone answers nothing, and never breaks the socket: after three
/// commands in a row time out, the connection is replaced (here the server was only paused,
/// and the new connection serves once it resumes).
#[tokio::test]
async fn commands_timing_out_in_a_row_replace_the_connection() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let url = server.url();
    let capture = Capture::new();
    let source = capture
        .scope(
            Multiplexed::builder(&url)
                .response_timeout(Duration::from_millis(100))
                .connect_timeout(Duration::from_millis(200))
                .connect(),
        )
        .await
        .unwrap();
    let reconnects = || capture.counter(REDIS_RECONNECTS.name, &[("server", &url)]);
    server.pause().unwrap();
    for expected in [0, 0, 1] {
        let mut conn = source.connection().await.unwrap();
        let stuck: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        assert!(stuck.is_err());
        assert_eq!(reconnects(), expected);
    }
    server.resume().unwrap();
    let started = Instant::now();
    while generation(&source).await.contains("generation: 0") {
        assert!(started.elapsed() < Duration::from_secs(3), "never replaced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    round_trip(&source, "replaced").await;
}

/// A silently dead peer is found even on an idle connection: every socket has TCP keepalive on
/// (the kernel then runs its keepalive timer, `tr` = 2 in `/proc/net/tcp`, on an idle socket).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn multiplexed_sockets_have_tcp_keepalive() {
    let server = RedisServer::builder().private().start().unwrap();
    let port = server.port().expect("a TCP server");
    let source = Multiplexed::connect(&server.url()).await.unwrap();
    round_trip(&source, "keepalive").await;
    let remote = format!(":{port:04X} ");
    let ours: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Sockets whose remote end is the server, established: ours.
            fields
                .get(2)
                .is_some_and(|rem| format!("{rem} ").ends_with(&remote))
                && fields.get(3) == Some(&"01")
        })
        .map(str::to_owned)
        .collect();
    assert!(!ours.is_empty(), "no connection to port {port} found");
    for line in &ours {
        let timer = line.split_whitespace().nth(5).unwrap();
        assert!(timer.starts_with("02:"), "no keepalive timer: {line}");
    }
}

/// The next push of `kind` within 5 s, skipping others.
async fn next_push(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    kind: redis::PushKind,
) -> redis::PushInfo {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let push = rx.recv().await.expect("the push sender was dropped");
            if push.kind == kind {
                return push;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} push within 5 s"))
}

async fn publish(server: &RedisServer, channel: &str, message: &str) {
    let publisher = Multiplexed::connect(&server.url()).await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(message)
        .query_async(&mut publisher.connection().await.unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_listening_connection_is_set_up_again_after_it_is_killed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = RedisServer::start().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let setups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&setups);
    let listener = Multiplexed::builder(&server.url())
        .push_sender(tx)
        .on_connect(move |mut connection| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let _: () = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg("listener")
                    .query_async(&mut connection)
                    .await?;
                connection.subscribe("news").await
            }
        })
        .connect()
        .await
        .unwrap();
    assert_eq!(setups.load(Ordering::SeqCst), 1);
    publish(&server, "news", "one").await;
    let message = next_push(&mut rx, redis::PushKind::Message).await;
    assert_eq!(message.data[1], redis::Value::BulkString(b"one".to_vec()));

    // Killed by the server: no command of ours finds it broken, yet it comes back, subscribed.
    server
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    next_push(&mut rx, redis::PushKind::Disconnection).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while setups.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "not set up again within 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The setup's SUBSCRIBE is confirmed before the connection is in use.
    next_push(&mut rx, redis::PushKind::Subscribe).await;
    publish(&server, "news", "two").await;
    let message = next_push(&mut rx, redis::PushKind::Message).await;
    assert_eq!(message.data[1], redis::Value::BulkString(b"two".to_vec()));
    drop(listener);
}

#[tokio::test]
async fn a_setup_that_fails_panics_or_hangs_fails_the_connect() {
    let server = RedisServer::start().unwrap();
    let failing = Multiplexed::builder(&server.url())
        .on_connect(|mut connection| async move {
            redis::cmd("NO-SUCH-COMMAND")
                .query_async::<()>(&mut connection)
                .await
        })
        .connect()
        .await;
    assert!(
        matches!(failing, Err(SourceError::Connect { .. })),
        "{failing:?}"
    );
    let panicking = Multiplexed::builder(&server.url())
        .on_connect(|_| async { panic!("setup panicked") })
        .connect()
        .await;
    assert!(matches!(panicking, Err(SourceError::Connect { .. })));
    let started = Instant::now();
    let hanging = Multiplexed::builder(&server.url())
        .response_timeout(Duration::from_millis(100))
        .on_connect(|_| std::future::pending())
        .connect()
        .await;
    assert!(matches!(hanging, Err(SourceError::Connect { .. })));
    assert!(started.elapsed() < Duration::from_secs(2));
}
