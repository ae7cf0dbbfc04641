//! `Instrumented` over deadpool-postgres and bb8-postgres, against a real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use brisk_core::deadline;
use brisk_metrics::catalog::{
    POOL_CONNECTIONS, POOL_PENDING, POOL_TIMEOUTS, POOL_USE_TIME, POOL_WAIT_TIME,
};
use brisk_metrics::testing::Capture;
use brisk_pool::{Instrumented, Pool, PoolError};
use brisk_testkit::Postgres;
use tokio::time::Instant;
use tokio_postgres::NoTls;

fn deadpool(url: &str, max: usize) -> deadpool_postgres::Pool {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = deadpool_postgres::Manager::new(config, NoTls);
    deadpool_postgres::Pool::builder(manager)
        .max_size(max)
        .build()
        .unwrap()
}

/// Spawns a checkout on `pool` and returns once it waits (every connection is out).
async fn spawn_waiter<P: Pool + Send + Sync + 'static>(
    pool: &Instrumented<P>,
) -> tokio::task::JoinHandle<Result<(), PoolError<P::Error>>> {
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    while pool.status().waiting != Some(1) {
        tokio::task::yield_now().await;
    }
    waiter
}

async fn bb8(url: &str, max: u32) -> bb8::Pool<bb8_postgres::PostgresConnectionManager<NoTls>> {
    let manager = bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls).unwrap();
    bb8::Pool::builder()
        .max_size(max)
        .build(manager)
        .await
        .unwrap()
}

const POOL: [(&str, &str); 1] = [("db_client_connection_pool_name", "main")];

/// A deadpool of `max` connections named `main`, whose metrics go to `capture`.
fn measured_pool(
    capture: &Capture,
    url: &str,
    max: usize,
) -> Instrumented<deadpool_postgres::Pool> {
    capture.run(|| {
        Instrumented::builder(deadpool(url, max))
            .name("main")
            .build()
            .unwrap()
    })
}

#[tokio::test]
async fn deadpool_checkouts_work_and_are_measured() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    capture
        .scope(async {
            let pool = Instrumented::builder(deadpool(&pg.url(), 4))
                .name("main")
                .build()
                .unwrap();
            let client = pool.get().await.unwrap();
            let row = client.query_one("SELECT 1::INT4", &[]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 1);
            let status = pool.status();
            assert_eq!((status.in_use(), status.max_size), (1, Some(4)));
            drop(client);
            assert_eq!(pool.status().in_use(), 0);
        })
        .await;
    assert_eq!(capture.histogram(POOL_WAIT_TIME.name, &POOL).len(), 1);
    assert_eq!(capture.histogram(POOL_USE_TIME.name, &POOL).len(), 1);
    let state = |s| {
        [
            ("db_client_connection_pool_name", "main"),
            ("db_client_connection_state", s),
        ]
    };
    assert_eq!(
        capture.gauge(POOL_CONNECTIONS.name, &state("used")),
        Some(0.0)
    );
    // Idle and max are read from the backend's status at most every 100 ms.
    assert!(
        capture
            .gauge(POOL_CONNECTIONS.name, &state("idle"))
            .is_some()
    );
    let max = brisk_metrics::catalog::POOL_MAX.name;
    assert_eq!(capture.gauge(max, &POOL), Some(4.0));
    assert_eq!(capture.gauge(POOL_PENDING.name, &POOL), Some(0.0));
}

#[tokio::test]
async fn bb8_checkouts_work_through_the_same_trait() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(bb8(&pg.url(), 2).await)
        .name("main")
        .build()
        .unwrap();
    let client = pool.get().await.unwrap();
    let row = client.query_one("SELECT 2::INT4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(pool.status().in_use(), 1);
    assert_eq!(pool.status().max_size, Some(2), "read from bb8's config");
}

async fn exhausted<P: Pool>(pool: Instrumented<P>, expect_max: Option<usize>) {
    let held = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the wait timeout"
    );
    let PoolError::Exhausted(diagnosis) = &err else {
        panic!("expected Exhausted, got {err:?}")
    };
    assert_eq!(diagnosis.pool, "main");
    assert_eq!(diagnosis.in_use, 1);
    assert_eq!(diagnosis.max_size, expect_max);
    assert!(diagnosis.waiting >= 1);
    assert!(diagnosis.oldest_checkout.unwrap() >= Duration::from_millis(20));
    assert!(diagnosis.waited >= Duration::from_millis(200));
    let text = err.to_string();
    assert!(
        text.starts_with("the pool's wait timeout fired: pool `main`: no connection after"),
        "{text}"
    );
    assert!(text.contains("1 in use"), "{text}");
    drop(held);
    assert!(
        pool.get().await.is_ok(),
        "a returned connection serves the next caller"
    );
}

#[tokio::test]
async fn an_exhausted_deadpool_says_why() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 1))
        .name("main")
        .wait_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    exhausted(pool, Some(1)).await;
}

#[tokio::test]
async fn an_exhausted_bb8_says_why() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(bb8(&pg.url(), 1).await)
        .name("main")
        .wait_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    exhausted(pool, Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_over_ten_connections_fail_with_a_diagnosis_within_their_bound() {
    let pg = Postgres::start().unwrap();
    let timeout = Duration::from_millis(100);
    let pool = Instrumented::builder(deadpool(&pg.url(), 10))
        .name("main")
        .wait_timeout(timeout)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                match pool.get().await {
                    Ok(client) => {
                        client
                            .query_one("SELECT pg_sleep(0.01)", &[])
                            .await
                            .unwrap();
                        (true, started.elapsed())
                    }
                    Err(PoolError::Exhausted(diagnosis)) => {
                        assert_eq!(diagnosis.max_size, Some(10));
                        assert!(diagnosis.in_use <= 10);
                        (false, started.elapsed())
                    }
                    Err(other) => panic!("unexpected {other:?}"),
                }
            })
        })
        .collect();
    let (mut served, mut failed) = (0, 0);
    for task in tasks {
        let (ok, waited) = task.await.unwrap();
        if ok {
            served += 1;
        } else {
            failed += 1;
            // The bound plus scheduling slack on a loaded 2-core machine.
            assert!(
                waited < timeout + Duration::from_millis(900),
                "waited {waited:?}"
            );
        }
    }
    assert!(served >= 10, "served {served}");
    assert!(
        failed > 0,
        "1,000 tasks on 10 connections with a 100 ms bound must shed some"
    );
    assert_eq!(pool.status().waiting, Some(0));
}

#[tokio::test]
async fn a_failing_backend_is_reported_and_counted() {
    // Nothing listens on this port: opening a connection fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let capture = Capture::new();
    let pool = measured_pool(&capture, &url, 1);
    let err = capture.scope(pool.get()).await.unwrap_err();
    assert!(matches!(err, PoolError::Backend(_)), "{err:?}");
    let reasons = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "backend"),
    ];
    assert_eq!(
        capture.counter(brisk_metrics::catalog::POOL_ERRORS.name, &reasons),
        1
    );
}

#[tokio::test]
async fn the_callers_deadline_cuts_the_wait_short() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = measured_pool(&capture, &pg.url(), 1);
    let _held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = deadline::scope(started + Duration::from_millis(100), pool.get())
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::Deadline { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not the 5 s wait timeout"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("the request's deadline fired: the checkout was allowed"),
        "{text}"
    );
    let spent = deadline::scope(Instant::now(), pool.get())
        .await
        .unwrap_err();
    assert!(
        spent
            .to_string()
            .starts_with("the request's deadline had passed before the checkout began"),
        "{spent}"
    );
    assert_eq!(
        capture.counter(POOL_TIMEOUTS.name, &POOL),
        2,
        "both checkouts"
    );
}

#[tokio::test]
async fn a_dropped_waiter_stops_counting_as_waiting() {
    let pg = Postgres::start().unwrap();
    let pool = Arc::new(
        Instrumented::builder(deadpool(&pg.url(), 1))
            .name("main")
            .build()
            .unwrap(),
    );
    let _held = pool.get().await.unwrap();
    let waiter = spawn_waiter(&pool).await;
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.status().waiting, Some(0));
}

#[test]
fn bad_settings_are_build_errors() {
    let config: tokio_postgres::Config = "postgres://x@127.0.0.1/db".parse().unwrap();
    let pool = || {
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .build()
            .unwrap()
    };
    let err = Instrumented::builder(pool())
        .wait_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("wait_timeout must be positive"),
        "{err}"
    );
    let err = Instrumented::builder(pool())
        .wait_timeout(Duration::MAX)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            brisk_pool::BuildError::TooLong {
                setting: "wait_timeout",
                max: brisk_pool::MAX_WAIT,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("wait_timeout of"), "{err}");
    let err = Instrumented::builder(pool())
        .recommend_every(Duration::MAX)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("recommend_every of"), "{err}");
    let err = Instrumented::builder(pool()).name("").build().unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
    let empty =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(0)
            .build()
            .unwrap();
    let err = Instrumented::builder(empty).build().unwrap_err();
    assert!(err.to_string().contains("max size is 0"), "{err}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let small = Instrumented::builder(pool()).build().unwrap();
    let mut greedy = brisk_pool::Lifecycle::default();
    greedy.min_idle = 1_000;
    let err = small.spawn_lifecycle(greedy).unwrap_err();
    assert!(err.to_string().contains("min_idle"), "{err}");
}

#[cfg(feature = "serde")]
#[test]
fn a_lifecycle_reads_from_configuration() {
    let lifecycle: brisk_pool::Lifecycle =
        serde_json::from_str(r#"{ "min_idle": 2, "idle_timeout": null }"#).unwrap();
    assert_eq!(lifecycle.min_idle, 2);
    assert_eq!(lifecycle.idle_timeout, None);
    assert_eq!(
        lifecycle.max_lifetime,
        brisk_pool::Lifecycle::default().max_lifetime,
        "unset fields keep their defaults"
    );
    let back: brisk_pool::Lifecycle =
        serde_json::from_str(&serde_json::to_string(&lifecycle).unwrap()).unwrap();
    assert_eq!(back, lifecycle);
    let typo = serde_json::from_str::<brisk_pool::Lifecycle>(r#"{ "min_idel": 2 }"#);
    assert!(typo.unwrap_err().to_string().contains("min_idel"));
}

#[tokio::test]
async fn a_task_asking_for_a_second_connection_is_noticed() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = measured_pool(&capture, &pg.url(), 4);
    let nested = brisk_metrics::catalog::POOL_NESTED.name;
    // Detection needs a task id, as every request handler has: run in tasks.
    let one_each = (0..2).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(drop) })
    });
    for task in one_each.collect::<Vec<_>>() {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        capture.counter(nested, &POOL),
        0,
        "one connection per task is fine"
    );
    tokio::spawn({
        let pool = pool.clone();
        async move {
            let first = pool.get().await.unwrap();
            let second = pool.get().await.unwrap(); // while holding `first`: counted
            drop((first, second));
            let _again = pool.get().await.unwrap(); // after returning both: fine
        }
    })
    .await
    .unwrap();
    assert_eq!(capture.counter(nested, &POOL), 1);
}

#[tokio::test]
async fn warm_up_opens_idle_connections_before_the_first_request() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 4))
        .name("main")
        .build()
        .unwrap();
    assert_eq!(pool.status().size, 0);
    assert_eq!(pool.warm_up(3).await.unwrap(), 3);
    let status = pool.status();
    assert_eq!((status.size, status.idle, status.in_use()), (3, 3, 0));
}

#[tokio::test]
async fn warm_up_reports_a_database_that_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = Instrumented::builder(deadpool(
        &format!("postgres://postgres@127.0.0.1:{port}/none"),
        2,
    ))
    .build()
    .unwrap();
    assert!(matches!(pool.warm_up(2).await, Err(PoolError::Backend(_))));
}

#[tokio::test]
async fn close_refuses_new_checkouts_and_waits_for_the_ones_out() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .name("main")
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(10)).await }
    });
    // Once closing, new checkouts fail at once, and the held connection still works.
    while !matches!(pool.get().await, Err(PoolError::Closed)) {
        tokio::task::yield_now().await;
    }
    held.query_one("SELECT 1", &[]).await.unwrap();
    assert!(!closing.is_finished(), "close waits for the connection out");
    drop(held);
    closing.await.unwrap().unwrap();
    assert!(pool.get_ref().is_closed());
}

#[tokio::test]
async fn close_gives_up_after_its_timeout_and_says_what_is_still_out() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .name("main")
        .build()
        .unwrap();
    let _held = pool.get().await.unwrap();
    let err = pool.close(Duration::from_millis(50)).await.unwrap_err();
    assert_eq!((err.pool.as_str(), err.in_use), ("main", 1));
    assert!(
        err.to_string()
            .contains("1 connection(s) still checked out"),
        "{err}"
    );
    assert!(matches!(pool.get().await, Err(PoolError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recommended_size_follows_the_measured_demand() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = capture.run(|| {
        Instrumented::builder(deadpool(&pg.url(), 8))
            .name("main")
            .recommend_every(Duration::from_millis(200))
            .build()
            .unwrap()
    });
    // Four callers, each always holding a connection: an average demand of about four.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_millis(700);
                while Instant::now() < until {
                    let held = pool.get().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    drop(held);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let recommended = brisk_metrics::catalog::POOL_RECOMMENDED.name;
    let size = capture
        .gauge(recommended, &POOL)
        .expect("set after the first window");
    assert!(
        (4.0..=8.0).contains(&size),
        "recommended {size} for a demand of about 4"
    );
}

/// After a restart, each pooled connection is dead; the pool must notice and open new ones, so
/// that at most one request per old connection sees it fail, and none sees it twice.
/// `select` runs `SELECT 1` on a checkout and says whether it worked.
async fn survives_a_restart<P, Q, Fut>(pg: &mut Postgres, pool: Instrumented<P>, select: Q)
where
    P: Pool,
    Q: Fn(brisk_pool::Checkout<P>) -> Fut,
    Fut: Future<Output = bool>,
{
    assert_eq!(pool.warm_up(3).await.unwrap(), 3);
    pg.restart().unwrap();
    let mut failures = 0;
    for _ in 0..12 {
        let checkout = pool
            .get()
            .await
            .expect("the database is back: checkouts succeed");
        if !select(checkout).await {
            failures += 1;
        }
    }
    assert!(
        failures <= 3,
        "{failures} requests got a dead connection; at most one per old connection"
    );
    assert!(select(pool.get().await.unwrap()).await);
}

#[tokio::test]
async fn deadpool_replaces_connections_broken_by_a_restart() {
    let mut pg = Postgres::builder().private().start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 3))
        .build()
        .unwrap();
    survives_a_restart(&mut pg, pool, |client| async move {
        client.query_one("SELECT 1", &[]).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn bb8_replaces_connections_broken_by_a_restart() {
    let mut pg = Postgres::builder().private().start().unwrap();
    let pool = Instrumented::builder(bb8(&pg.url(), 3).await)
        .build()
        .unwrap();
    survives_a_restart(&mut pg, pool, |client| async move {
        client.query_one("SELECT 1", &[]).await.is_ok()
    })
    .await;
}

fn lifecycle(max_lifetime: Option<u64>, idle_timeout: Option<u64>) -> brisk_pool::Lifecycle {
    let mut lifecycle = brisk_pool::Lifecycle::default();
    lifecycle.max_lifetime = max_lifetime.map(Duration::from_millis);
    lifecycle.jitter = Duration::from_millis(50);
    lifecycle.idle_timeout = idle_timeout.map(Duration::from_millis);
    lifecycle.reap_every = Duration::from_millis(50);
    lifecycle
}

#[tokio::test]
async fn deadpool_connections_past_their_lifetime_are_reaped() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 4))
        .build()
        .unwrap();
    pool.warm_up(3).await.unwrap();
    let lifecycle = lifecycle(Some(300), None);
    assert_eq!(pool.reap(&lifecycle), 0, "young connections stay");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        pool.reap(&lifecycle),
        3,
        "every connection is past its lifetime"
    );
    assert_eq!(pool.status().size, 0);
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn deadpool_idle_connections_are_reaped_busy_ones_kept() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 4))
        .build()
        .unwrap();
    pool.warm_up(2).await.unwrap();
    let lifecycle = lifecycle(None, Some(100));
    // Idle time counts from the first round that sees a connection back in the pool.
    assert_eq!(pool.reap(&lifecycle), 0, "first seen idle now");
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Use one of them: it is busy again, and idle anew once back.
    drop(pool.get().await.unwrap());
    assert_eq!(pool.reap(&lifecycle), 1, "only the unused one");
    assert_eq!(pool.status().size, 1);
}

#[tokio::test]
async fn deadpool_does_not_reap_a_connection_held_past_the_idle_timeout_as_it_returns() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .build()
        .unwrap();
    let lifecycle = lifecycle(None, Some(100));
    let held = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(held);
    assert_eq!(pool.reap(&lifecycle), 0, "in use all along, idle only now");
    assert_eq!(pool.status().idle, 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(pool.reap(&lifecycle), 1, "idle past the timeout now");
}

/// Waits until `pool` has `idle` idle connections, failing the test after `limit`.
async fn idle_within<P: Pool>(pool: &Instrumented<P>, idle: usize, limit: Duration) {
    let started = Instant::now();
    while pool.status().idle < idle {
        assert!(
            started.elapsed() < limit,
            "not {idle} idle within {limit:?}: {:?}",
            pool.status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_lifecycle_task_warms_the_pool_at_once() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 4))
        .build()
        .unwrap();
    let mut lifecycle = lifecycle(None, None);
    lifecycle.min_idle = 3;
    // Far longer than the test: only the first round can warm the pool.
    lifecycle.reap_every = Duration::from_secs(3600);
    let task = pool.spawn_lifecycle(lifecycle).unwrap();
    // Not warmed before the first reap interval, otherwise.
    idle_within(&pool, 3, Duration::from_secs(5)).await;
    task.abort();
}

#[tokio::test]
async fn the_lifecycle_task_reaps_and_keeps_min_idle() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 4))
        .build()
        .unwrap();
    let mut lifecycle = lifecycle(Some(200), None);
    lifecycle.min_idle = 2;
    let task = pool.spawn_lifecycle(lifecycle).unwrap();
    idle_within(&pool, 2, Duration::from_secs(5)).await;
    pool.close(Duration::from_secs(1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("ends when the pool closes")
        .unwrap();
}

#[tokio::test]
async fn bb8_applies_the_same_lifecycle_itself() {
    let pg = Postgres::start().unwrap();
    let manager =
        bb8_postgres::PostgresConnectionManager::new_from_stringlike(pg.url(), NoTls).unwrap();
    let builder = lifecycle(Some(200), None).bb8(bb8::Pool::builder().max_size(4));
    let pool = Instrumented::builder(builder.build(manager).await.unwrap())
        .build()
        .unwrap();
    drop((pool.get().await.unwrap(), pool.get().await.unwrap()));
    assert_eq!(pool.status().size, 2);
    let started = Instant::now();
    while pool.status().size > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bb8 never reaped old connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pool.reap(&lifecycle(Some(200), None)),
        0,
        "bb8 reaps by itself"
    );
}

#[test]
fn an_invalid_lifecycle_is_refused() {
    let config: tokio_postgres::Config = "postgres://x@127.0.0.1/db".parse().unwrap();
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config, NoTls))
        .build()
        .unwrap();
    let pool = Instrumented::builder(pool).build().unwrap();
    let mut bad = lifecycle(Some(100), None);
    bad.jitter = Duration::from_millis(500);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    assert!(
        pool.spawn_lifecycle(bad)
            .unwrap_err()
            .to_string()
            .contains("jitter")
    );
}

#[tokio::test]
async fn a_measured_manager_times_every_connection_it_opens() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = capture.run(|| {
        let config: tokio_postgres::Config = pg.url().parse().unwrap();
        let manager =
            brisk_pool::Measured::new(deadpool_postgres::Manager::new(config, NoTls), "main");
        deadpool::managed::Pool::<brisk_pool::Measured<deadpool_postgres::Manager>>::builder(
            manager,
        )
        .max_size(4)
        .build()
        .unwrap()
    });
    let pool = Instrumented::builder(pool).name("main").build().unwrap();
    pool.warm_up(2).await.unwrap();
    let created = brisk_metrics::catalog::POOL_CREATE_TIME.name;
    assert_eq!(capture.histogram(created, &POOL).len(), 2);
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    assert_eq!(
        capture.histogram(created, &POOL).len(),
        2,
        "reused, not reopened"
    );
}

#[tokio::test]
async fn over_bb8_the_diagnosis_names_the_connection_error_bb8_keeps_to_itself() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let capture = Capture::new();
    let manager = capture.run(|| {
        let manager =
            bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls).unwrap();
        brisk_pool::Measured::new(manager, "main")
    });
    let creations = manager.creations();
    let pool = bb8::Pool::builder().max_size(1).build_unchecked(manager);
    let pool = Instrumented::builder(pool)
        .name("main")
        .wait_timeout(Duration::from_millis(300))
        .creations(creations)
        .build()
        .unwrap();
    let err = pool.get().await.unwrap_err();
    let PoolError::Exhausted(diagnosis) = &err else {
        panic!("expected Exhausted, got {err:?}")
    };
    let last = diagnosis
        .last_error
        .as_deref()
        .expect("the refused connection is named");
    assert!(
        last.contains("error connecting") || last.contains("refused"),
        "{last}"
    );
    assert!(err.to_string().contains("last connection error"), "{err}");
    let errors = brisk_metrics::catalog::POOL_CREATE_ERRORS.name;
    assert!(capture.counter(errors, &POOL) >= 1);
}

#[tokio::test]
async fn a_pool_grown_past_its_wrapped_size_still_hands_out_and_takes_back() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .build()
        .unwrap();
    // Holder slots are made at wrapping: at least 256, so the two extra checkouts are tracked.
    pool.get_ref().resize(4);
    let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(pool.status().in_use(), 4);
    drop(held);
    assert_eq!(pool.status().in_use(), 0);
    pool.close(Duration::from_secs(1)).await.unwrap();
}

/// Runs a 3 s query under a 100 ms deadline, then asks the pool of one for its connection
/// again: the next query must not queue behind the one cut off.
async fn a_cut_off_query_is_not_inherited<P, Q, Fut>(pool: Instrumented<P>, query: Q)
where
    P: Pool,
    Q: Fn(brisk_pool::Checkout<P>, &'static str) -> Fut,
    Fut: Future<Output = bool>,
{
    assert_eq!(pool.warm_up(1).await.unwrap(), 1);
    let started = Instant::now();
    // As a timeout layer runs a handler: the deadline in scope, the work bounded by it.
    let cut = deadline::scope(started + Duration::from_millis(100), async {
        deadline::bounded(Duration::from_secs(10), async {
            let client = pool.get().await.unwrap();
            query(client, "SELECT pg_sleep(3)").await
        })
        .await
    })
    .await;
    assert!(cut.is_err(), "the deadline cut the query off");
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(2), async {
        let client = pool.get().await.unwrap();
        query(client, "SELECT 1").await
    })
    .await;
    assert!(
        matches!(next, Ok(true)),
        "the next query waited behind the cut one: {next:?} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn deadpool_closes_a_connection_whose_query_was_cut_off() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 1))
        .wait_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    a_cut_off_query_is_not_inherited(pool, |client, sql| async move {
        client.simple_query(sql).await.is_ok()
    })
    .await;
}

/// bb8 over a `Measured` manager: what lets a checkout close its connection.
async fn measured_bb8(
    url: &str,
    max: u32,
) -> bb8::Pool<brisk_pool::Measured<bb8_postgres::PostgresConnectionManager<NoTls>>> {
    let manager = bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls).unwrap();
    bb8::Pool::builder()
        .max_size(max)
        .build(brisk_pool::Measured::new(manager, "main"))
        .await
        .unwrap()
}

#[tokio::test]
async fn bb8_closes_a_connection_whose_query_was_cut_off() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(measured_bb8(&pg.url(), 1).await)
        .wait_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    a_cut_off_query_is_not_inherited(pool, |client, sql| async move {
        client.simple_query(sql).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn discard_closes_the_connection_instead_of_returning_it() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .build()
        .unwrap();
    let client = pool.get().await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    client.discard();
    let status = pool.status();
    assert_eq!((status.size, status.in_use()), (0, 0), "{status:?}");
    let again = pool.get().await.unwrap();
    let other: i32 = again
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, other, "a new connection, not the discarded one");

    let bb8 = Instrumented::builder(measured_bb8(&pg.url(), 1).await)
        .build()
        .unwrap();
    let client = bb8.get().await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    client.discard();
    let again = bb8.get().await.unwrap();
    let other: i32 = again
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, other, "bb8 opened a new connection");
}

#[tokio::test]
async fn close_waits_for_a_checkout_still_connecting_which_then_fails() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .build()
        .unwrap();
    let connecting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    // One poll on this current-thread runtime: the checkout is past the `closed` check and
    // opening a connection (PostgreSQL's handshake takes round trips).
    tokio::task::yield_now().await;
    assert!(!connecting.is_finished());
    pool.close(Duration::from_secs(5)).await.unwrap();
    assert!(
        connecting.is_finished(),
        "close reported drained while a checkout was still connecting"
    );
    let result = connecting.await.unwrap();
    assert!(matches!(result, Err(PoolError::Closed)), "{result:?}");
}

#[tokio::test]
async fn a_database_that_is_down_is_not_hammered() {
    // Nothing listens on this port: every attempt to connect fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let capture = Capture::new();
    let pool = capture.run(|| {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let manager =
            brisk_pool::Measured::new(deadpool_postgres::Manager::new(config, NoTls), "main");
        let pool =
            deadpool::managed::Pool::<brisk_pool::Measured<deadpool_postgres::Manager>>::builder(
                manager,
            )
            .max_size(4)
            .build()
            .unwrap();
        Instrumented::builder(pool).name("main").build().unwrap()
    });
    // A second of checkouts, one every millisecond: about a thousand.
    let (mut checkouts, mut fast) = (0_u64, 0_u64);
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let started = Instant::now();
        match capture.scope(pool.get()).await.map(drop).unwrap_err() {
            PoolError::Unavailable(why) => {
                fast += 1;
                assert!(
                    started.elapsed() < Duration::from_millis(200),
                    "failed fast"
                );
                assert!(why.failures >= 1 && why.retry_in <= Duration::from_secs(2));
                let last = why.last_error.as_deref().unwrap_or_default();
                assert!(last.contains("error connecting"), "{why}");
            }
            PoolError::Backend(_) => {}
            other => panic!("unexpected {other:?}"),
        }
        checkouts += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let attempts = capture.counter(brisk_metrics::catalog::POOL_CONNECT_ATTEMPTS.name, &POOL);
    // 50 ms doubling (each cut by up to half) up to 2 s: at most about ten attempts in a second.
    assert!(
        (1..=12).contains(&attempts),
        "{attempts} connection attempts for {checkouts} checkouts"
    );
    assert!(
        fast >= checkouts.saturating_sub(12),
        "{fast} of {checkouts} failed fast"
    );
    let unavailable = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "unavailable"),
    ];
    assert_eq!(
        capture.counter(brisk_metrics::catalog::POOL_ERRORS.name, &unavailable),
        fast
    );
}

#[tokio::test]
async fn a_backend_error_says_what_the_database_said() {
    let pg = Postgres::start().unwrap();
    let port = pg.port().unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/no_such_database");
    let capture = Capture::new();
    let pool = measured_pool(&capture, &url, 1);
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, PoolError::Backend(_)), "{err:?}");
    // tokio-postgres's own message is a bare "db error"; the database's is in its source.
    let text = err.to_string();
    assert!(
        text.starts_with("the pool could not open a connection: db error")
            && text.contains("\"no_such_database\" does not exist"),
        "{text}"
    );
}

#[tokio::test]
async fn a_host_that_never_answers_is_named_as_the_likely_cause() {
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let pool = Instrumented::builder(deadpool(
        &format!("postgres://postgres@127.0.0.1:{port}/none"),
        2,
    ))
    .wait_timeout(Duration::from_millis(200))
    .build()
    .unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
    assert!(
        err.to_string().contains("reachable but not answering"),
        "{err}"
    );
}

#[tokio::test]
async fn warm_up_above_the_pool_size_opens_up_to_the_size() {
    let pg = Postgres::start().unwrap();
    let deadpool = Instrumented::builder(deadpool(&pg.url(), 2))
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert_eq!(deadpool.warm_up(5).await.unwrap(), 2);
    let bb8 = Instrumented::builder(bb8(&pg.url(), 2).await)
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert_eq!(bb8.warm_up(5).await.unwrap(), 2);
}

#[tokio::test]
async fn warm_up_is_not_a_request() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = measured_pool(&capture, &pg.url(), 4);
    // In a task, as a service warms its pool: its connections are not nested checkouts.
    tokio::spawn({
        let pool = pool.clone();
        async move {
            assert_eq!(pool.warm_up(3).await.unwrap(), 3);
            assert_eq!(
                pool.warm_up(3).await.unwrap(),
                3,
                "a warm pool stays as it is"
            );
        }
    })
    .await
    .unwrap();
    assert_eq!(pool.status().size, 3, "opened only what was missing");
    let nested = brisk_metrics::catalog::POOL_NESTED.name;
    assert_eq!(capture.counter(nested, &POOL), 0);
    assert!(capture.histogram(POOL_WAIT_TIME.name, &POOL).is_empty());
    assert!(capture.histogram(POOL_USE_TIME.name, &POOL).is_empty());
}

#[tokio::test]
async fn the_lifecycle_top_up_never_waits_for_a_connection_in_use() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .wait_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let mut lifecycle = lifecycle(None, None);
    lifecycle.min_idle = 2;
    lifecycle.reap_every = Duration::from_secs(3600);
    let task = pool.spawn_lifecycle(lifecycle).unwrap();
    // Only one connection can be opened beside the held one: the top-up opens it and lets go,
    // instead of holding it while it waits for the held one.
    idle_within(&pool, 1, Duration::from_secs(2)).await;
    let started = Instant::now();
    let second = pool.get().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a request queued behind the top-up for {:?}",
        started.elapsed()
    );
    drop((held, second));
    task.abort();
}

#[tokio::test]
async fn the_idle_gauge_catches_up_after_the_last_return() {
    let pg = Postgres::start().unwrap();
    let capture = Capture::new();
    let pool = capture.run(|| {
        Instrumented::builder(deadpool(&pg.url(), 4))
            .name("main")
            .build()
            .unwrap()
    });
    let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Returned together: checkouts refresh the gauges at most every 100 ms, so the returns
    // after the first go unseen by them.
    drop(held);
    let idle = [
        ("db_client_connection_pool_name", "main"),
        ("db_client_connection_state", "idle"),
    ];
    let started = Instant::now();
    while capture.gauge(POOL_CONNECTIONS.name, &idle) != Some(4.0) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "idle gauge stuck at {:?} with 4 idle",
            capture.gauge(POOL_CONNECTIONS.name, &idle)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_recommended_size_reads_the_pool_size_before_its_first_window() {
    let config: tokio_postgres::Config = "postgres://x@127.0.0.1/db".parse().unwrap();
    let capture = Capture::new();
    let _pool = capture.run(|| {
        let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config, NoTls))
            .max_size(8)
            .build()
            .unwrap();
        Instrumented::builder(pool).name("main").build().unwrap()
    });
    let recommended = brisk_metrics::catalog::POOL_RECOMMENDED.name;
    assert_eq!(
        capture.gauge(recommended, &POOL),
        Some(8.0),
        "no change recommended yet, not 0"
    );
}

#[tokio::test]
async fn warm_up_yields_to_callers_waiting_for_a_connection() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 1))
        .wait_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let waiter = spawn_waiter(&pool).await;
    let started = Instant::now();
    assert_eq!(
        pool.warm_up(1).await.unwrap(),
        0,
        "nothing idle, nothing opened"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "warm-up queued with the waiter for {:?}",
        started.elapsed()
    );
    drop(held);
    waiter.await.unwrap().unwrap();
}

#[test]
fn a_backoff_that_cannot_work_is_refused() {
    let config: tokio_postgres::Config = "postgres://x@127.0.0.1/db".parse().unwrap();
    let pool = || {
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .build()
            .unwrap()
    };
    let secs = Duration::from_secs;
    for (first, max, says) in [
        (
            Duration::ZERO,
            secs(1),
            "connect_backoff first must be positive",
        ),
        (secs(1), Duration::MAX, "connect_backoff max of"),
        (secs(2), secs(1), "first pause must not exceed"),
    ] {
        let err = Instrumented::builder(pool())
            .connect_backoff(first, max)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
}

#[tokio::test]
async fn on_discard_can_cancel_the_query_a_deadline_cut_off() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 2))
        .on_discard(|client: &mut deadpool_postgres::Object| {
            let token = client.cancel_token();
            tokio::spawn(async move { token.cancel_query(NoTls).await });
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let cut = deadline::scope(started + Duration::from_millis(100), async {
        deadline::bounded(Duration::from_secs(10), async {
            let client = pool.get().await.unwrap();
            client.simple_query("SELECT pg_sleep(30)").await.map(drop)
        })
        .await
    })
    .await;
    assert!(cut.is_err(), "the deadline cut the query off");
    // Closing the connection alone would leave the query sleeping on the server for 30 s.
    let watcher = pool.get().await.unwrap();
    let started = Instant::now();
    loop {
        let running: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the cut-off query still runs on the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn close_fails_the_callers_waiting_at_once() {
    let pg = Postgres::start().unwrap();
    let pool = Instrumented::builder(deadpool(&pg.url(), 1))
        .wait_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let waiter = spawn_waiter(&pool).await;
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(10)).await }
    });
    let started = Instant::now();
    let waited = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiter is not left to its 5 s wait timeout")
        .unwrap();
    assert!(matches!(waited, Err(PoolError::Closed)), "{waited:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    held.query_one("SELECT 1", &[]).await.unwrap();
    drop(held);
    closing.await.unwrap().unwrap();
}

#[tokio::test]
async fn over_bb8_checkouts_fail_fast_while_bb8_cannot_connect() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let manager = bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls).unwrap();
    let manager = brisk_pool::Measured::new(manager, "main");
    let creations = manager.creations();
    let pool = Instrumented::builder(bb8::Pool::builder().max_size(2).build_unchecked(manager))
        .wait_timeout(Duration::from_millis(300))
        .creations(creations)
        .build()
        .unwrap();
    // The first checkout waits while bb8 tries (and retries) in the background.
    let first = pool.get().await.unwrap_err();
    assert!(matches!(first, PoolError::Exhausted(_)), "{first:?}");
    // bb8's failed attempts, reported by `Measured`, make the next checkouts fail at once
    // instead of each waiting out its 300 ms; once per pause one of them waits, to try again.
    let (mut fast, mut waited) = (0, 0);
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        match pool.get().await {
            Err(PoolError::Unavailable(why)) => {
                let last = why.last_error.as_deref().unwrap_or_default();
                assert!(last.contains("error connecting"), "{why}");
                fast += 1;
            }
            Err(PoolError::Exhausted(_)) => waited += 1,
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        fast >= 20 && waited <= 5,
        "{fast} failed fast, {waited} waited"
    );
}
