//! `Instrumented` over deadpool-redis while the Redis server dies and comes back.

use std::time::Duration;

use brisk_pool::{Instrumented, PoolError};
use brisk_testkit::RedisServer;
use tokio::time::Instant;

async fn ping(conn: &mut deadpool_redis::redis::aio::MultiplexedConnection) -> bool {
    deadpool_redis::redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .is_ok()
}

/// Waits until a checkout answers PING again, failing the test after `limit`.
async fn serving_within(pool: &Instrumented<deadpool_redis::Pool>, limit: Duration) {
    let back = Instant::now();
    loop {
        if let Ok(mut conn) = pool.get().await
            && ping(&mut conn).await
        {
            return;
        }
        assert!(back.elapsed() < limit, "not serving again within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A deadpool-redis pool of `max` connections, instrumented with a `wait` bound.
fn redis_pool(
    server: &RedisServer,
    max: usize,
    wait: Duration,
) -> Instrumented<deadpool_redis::Pool> {
    let pool = deadpool_redis::Config::from_url(server.url())
        .builder()
        .unwrap()
        .max_size(max)
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
async fn redis_killed_then_restarted() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let wait = Duration::from_millis(300);
    let pool = redis_pool(&server, 2, wait);
    let mut held = pool.get().await.unwrap();
    assert!(ping(&mut held).await);

    server.kill().unwrap();
    // The free slot cannot open a connection: the checkout fails fast, naming the cause.
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(
        started.elapsed() < wait,
        "failed fast, not after the wait timeout"
    );
    let PoolError::Backend(cause) = &err else {
        panic!("expected a backend error, got {err:?}")
    };
    assert!(cause.to_string().contains("refused"), "{cause}");
    // The connection held across the kill is dead; returning it must not poison the pool.
    assert!(!ping(&mut held).await);
    drop(held);

    server.restart().unwrap();
    serving_within(&pool, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_every_waiting_call_returns_within_its_bound() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let wait = Duration::from_millis(200);
    let pool = redis_pool(&server, 4, wait);
    assert_eq!(pool.warm_up(4).await.unwrap(), 4);

    server.pause().unwrap();
    // Recycling an idle connection pings it, and nothing answers: every caller must still get
    // an answer — an error — within its bound.
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = pool.get().await.map(drop);
                (result, started.elapsed())
            })
        })
        .collect();
    for caller in callers {
        let (result, waited) = caller.await.unwrap();
        let err = result.expect_err("a paused server serves nobody");
        assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
        assert!(
            waited < wait + Duration::from_millis(800),
            "waited {waited:?}"
        );
    }

    server.resume().unwrap();
    serving_within(&pool, Duration::from_secs(2)).await;
}
